"""Frozen, validated configuration for CoOp.

Every config is a frozen dataclass that validates itself at construction and raises a ``ValueError`` saying what is
wrong and what is allowed. Override fields with ``dataclasses.replace``; serialise with ``dataclasses.asdict`` (the
JSON written next to every checkpoint and logged as MLflow params).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PRECISIONS = ("fp32", "bf16", "amp")
FEATURE_MODES = ("cached", "exact")
TEXT_SHARDINGS = ("auto", "data", "class")
# The prompt learners: CoOp and its successors that keep CLIP frozen and learn only vectors (coop_core.methods).
METHODS = ("coop", "kgcoop", "prograd", "cocoop")
METHOD_TITLES = {"coop": "CoOp", "kgcoop": "KgCoOp", "prograd": "ProGrad", "cocoop": "CoCoOp"}  # how tables name them

# CoOp's schedule: epochs by number of shots (Zhou et al., Sec. 4.1 / configs/trainers/CoOp/*.yaml).
EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
# ``shots="all"``: every training image of every class (asked for explicitly; a number larger than a class is an error).
ALL_SHOTS = "all"


def check_shots(shots: int | str) -> None:
    """Raise ``ValueError`` unless ``shots`` is a positive integer or ``"all"``."""
    if shots == ALL_SHOTS:
        return
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
        raise ValueError(f"shots must be a positive integer or {ALL_SHOTS!r} (every training image), got {shots!r}")


def default_epochs(shots: int | str) -> int:
    """CoOp's epoch count for ``shots`` (1 -> 50, 2/4 -> 100, 8/16 -> 200; other values use the next larger key;
    ``"all"`` as 16)."""
    check_shots(shots)
    if shots == ALL_SHOTS:
        return EPOCHS_BY_SHOTS[16]
    for k in sorted(EPOCHS_BY_SHOTS):
        if shots <= k:
            return EPOCHS_BY_SHOTS[k]
    return EPOCHS_BY_SHOTS[16]


@dataclass(frozen=True)
class PromptConfig:
    """How the learnable prompt is built.

    n_ctx: number of learnable context vectors (ignored when ``ctx_init`` is given: its word-token count wins, unless
        ``pad_ctx_init``).
    ctx_init: words to initialise the context from (e.g. "a photo of a"); "" means random N(0, 0.02^2).
    csc: class-specific context (one context per class) instead of one unified context.
    class_token_position: where the class name sits relative to the context: end, middle or front.
    pad_ctx_init: keep ``n_ctx`` when ``ctx_init`` has fewer tokens: its words fill the last context slots and the
        first ones start at zero (ProGrad's initialisation, ``n_ctx=16`` around "a centered satellite photo of").
    """

    n_ctx: int = 16
    ctx_init: str = ""
    csc: bool = False
    class_token_position: str = "end"
    pad_ctx_init: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.n_ctx, int) or isinstance(self.n_ctx, bool) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {self.n_ctx!r}")
        if self.n_ctx > 64:
            raise ValueError(f"n_ctx must be <= 64 (the prompt must fit CLIP's 77-token context), got {self.n_ctx}")
        if not isinstance(self.ctx_init, str):
            raise ValueError(f"ctx_init must be a string ('' for random init), got {self.ctx_init!r}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {self.class_token_position!r}"
            )
        if not isinstance(self.csc, bool):
            raise ValueError(f"csc must be a bool, got {self.csc!r}")
        if not isinstance(self.pad_ctx_init, bool):
            raise ValueError(f"pad_ctx_init must be a bool, got {self.pad_ctx_init!r}")


@dataclass(frozen=True)
class TrainConfig:
    """CoOp's training recipe; defaults are the paper's.

    shots: training images per class (K), or ``"all"`` for every training image.
    lr/momentum/weight_decay: SGD hyper-parameters. epochs: None means CoOp's schedule by shots.
    warmup_epochs/warmup_lr: constant-lr warm-up; when it ends the cosine (over all epochs) starts at ``lr``, as
    Dassl's recounting warm-up does (see ``engine.lr_at``). batch_size: the *global* batch.
    precision: fp32, bf16 (autocast, fp32 master context) or amp (fp16 autocast + loss scaling, CUDA only).
    feature_mode: "cached" trains from pre-computed frozen image features (``n_views`` augmented views per image);
    "exact" runs the frozen image encoder on freshly augmented images every step, as the reference does.
    eval_every: validate every this many epochs (and always after the last). loader_workers: DataLoader processes
    for image loading during feature extraction (0 = in the calling process).
    text_sharding: how a multi-worker run splits the text step: "data" (every worker encodes every class prompt),
    "class" (each encodes its share of them; the features are all-gathered) or "auto" (class sharding when the text
    step's activations outweigh the model: ``coop_core.distributed.choose_text_sharding``). Either gives the
    one-process optimisation steps; only memory and time differ.
    """

    shots: int | str = 16
    seed: int = 1
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = "fp32"
    feature_mode: str = "cached"
    n_views: int = 10
    eval_every: int = 1
    loader_workers: int = 0
    text_sharding: str = "auto"

    def __post_init__(self) -> None:
        check_shots(self.shots)
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (CoOp's schedule by shots), got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"feature_mode must be one of {FEATURE_MODES}, got {self.feature_mode!r}")
        if self.n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers (DataLoader processes) must be >= 0, got {self.loader_workers}")
        if self.text_sharding not in TEXT_SHARDINGS:
            raise ValueError(f"text_sharding must be one of {TEXT_SHARDINGS}, got {self.text_sharding!r}")

    @property
    def resolved_epochs(self) -> int:
        """Epochs to run: the explicit value, or CoOp's schedule for ``shots``."""
        return self.epochs if self.epochs is not None else default_epochs(self.shots)


@dataclass(frozen=True)
class MethodConfig:
    """Which prompt learner trains the prompts, and its own hyper-parameters (``coop_core.methods``).

    name: ``coop`` (cross-entropy), ``kgcoop`` (plus a pull of each class's text feature toward its hand-crafted
        prompt's), ``prograd`` (the cross-entropy gradient projected off the direction that conflicts with the
        zero-shot prediction's) or ``cocoop`` (the context shifted per image by a small meta-net).
    kg_weight: KgCoOp's weight of ``1 - mean_c cos(w_c, w_c^clip)`` (``TRAINER.COOP.W``; 8.0 in its base-to-new script).
    prograd_lambda: ProGrad's lambda, how much of the conflicting component is removed (``LOSS.LAMBDA``: 1.0; its
        README uses 0.8 for 8 and 16 shots on Flowers102, DTD and EuroSAT).
    prograd_temperature: ProGrad's temperature T of the distillation toward zero-shot CLIP (``LOSS.T``, 1.0).
    meta_net_ratio: CoCoOp's meta-net bottleneck, ``embed_dim -> embed_dim // ratio -> width`` (16).
    The fields of the methods not chosen are kept (and recorded) but unused.
    """

    name: str = "coop"
    kg_weight: float = 8.0
    prograd_lambda: float = 1.0
    prograd_temperature: float = 1.0
    meta_net_ratio: int = 16

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.name!r}")
        for name in ("kg_weight", "prograd_lambda", "prograd_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.kg_weight < 0:
            raise ValueError(f"kg_weight (KgCoOp's weight of its text-feature term) must be >= 0, got {self.kg_weight}")
        if self.prograd_lambda < 0:
            raise ValueError(f"prograd_lambda must be >= 0 (1.0 removes the whole conflicting component), got "
                             f"{self.prograd_lambda}")
        if not self.prograd_temperature > 0:
            raise ValueError(f"prograd_temperature must be > 0, got {self.prograd_temperature}")
        ratio = self.meta_net_ratio
        if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
            raise ValueError(f"meta_net_ratio must be a positive integer (CoCoOp uses 16), got {ratio!r}")


def check_method_prompt(method: MethodConfig, prompt: PromptConfig) -> None:
    """Refuse a prompt the method cannot train: CoCoOp shifts one shared context per image, so it needs a unified
    context with the class name at the end (its reference builds only that prompt).

    Raises:
        ValueError: which setting does not fit, and what to use.
    """
    if method.name != "cocoop":
        return
    if prompt.csc:
        raise ValueError("cocoop shifts one shared context by each image's meta-net output: it has no class-specific "
                         "context (use csc false)")
    if prompt.class_token_position != "end":
        raise ValueError(f"cocoop puts the class name at the end (as its reference does), got class_token_position "
                         f"{prompt.class_token_position!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which CLIP to load.

    backbone: an open_clip architecture name (``ViT-B-16``, ``RN50``) or a path to an open_clip model-config JSON.
    pretrained: an open_clip pretrained tag (``openai``), a local checkpoint path, or "none" for random weights.
    """

    backbone: str = "ViT-B-16"
    pretrained: str = "openai"

    def __post_init__(self) -> None:
        if not self.backbone:
            raise ValueError("backbone must be an open_clip model name or a model-config JSON path")
        if not self.pretrained:
            raise ValueError("pretrained must be a tag (e.g. 'openai'), a checkpoint path, or 'none'")


def to_json(cfg: Any) -> str:
    """Serialise a config dataclass (or a dict of them) to stable, sorted JSON."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in cfg.items()
    }
    return json.dumps(data, sort_keys=True, indent=2)
