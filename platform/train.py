"""Train CoOp on one dataset as a Ray Train job: ``python -m platform.train --dataset eurosat``.

The worker (:func:`train_loop_per_worker`) is plain ``coop_core`` plus three marked Ray calls (get the context, get
the checkpoint, report). Every worker loads the same frozen CLIP and the same few-shot split, reads image features
from the shared, locked feature cache, and runs ``coop_core.engine.train`` with a :class:`TorchDistributed` process
group: each takes its shard of every deterministic global batch and the context gradient is all-reduced, so any
number of workers takes the one-worker optimisation steps. Rank 0 writes a checkpoint (context, optimiser, scheduler,
RNG, metric history) every epoch; a failed worker makes Ray Train restart the group from the last checkpoint
(``FailureConfig``). After the last epoch rank 0 evaluates the final model on the test split (never used for
selection), plus zero-shot CLIP, and saves the learned prompts, the resolved config and the nearest-words table.

The driver (:func:`main`) validates data and weights before starting Ray (offline failures are one line, exit 2),
runs the trainer, then logs the run to MLflow from this one process (``platform.tracking``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from platform.distributed import TorchDistributed
from typing import Any

import torch

from coop_core.backbone import NO_WEIGHTS, WeightsUnavailableError, load_clip, resolve_model_name
from coop_core.config import CLASS_TOKEN_POSITIONS, FEATURE_MODES, PRECISIONS, ModelConfig, PromptConfig, TrainConfig
from coop_core.datasets import DatasetNotFoundError, DatasetSplits, Item, list_datasets, load_dataset
from coop_core.engine import TrainState, evaluate, train
from coop_core.fewshot import build_few_shot
from coop_core.interpret import nearest_words, nearest_words_table
from coop_core.pipeline import build_model, prepare_features
from coop_core.prompts_io import PromptMeta, save_prompts
from coop_core.text_encoder import text_tower
from coop_core.zeroshot import zeroshot_evaluate

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
PROMPTS_FILE = "prompts.safetensors"
NEAREST_WORDS_FILE = "nearest_words.txt"

EPOCH_METRICS = ("epoch", "train_loss", "train_acc", "lr", "val_acc", "val_macro_f1", "epoch_time_s")
FINAL_METRICS = ("test_acc", "test_macro_f1", "zeroshot_test_acc", "zeroshot_test_macro_f1")

_SECTIONS = {"model": ModelConfig, "prompt": PromptConfig, "train": TrainConfig}


def default_cache_dir() -> str:
    """``$COOP_CACHE_DIR``, else ``~/.cache/coop`` when the home directory is writable, else ``./.cache/coop``."""
    env = os.environ.get("COOP_CACHE_DIR")
    if env:
        return str(Path(env).expanduser().resolve())
    home = Path.home()
    if home.is_dir() and os.access(home, os.W_OK):
        return str(home / ".cache" / "coop")
    return str(Path(".cache", "coop").resolve())


def default_data_root() -> str:
    """``$COOP_DATA_ROOT``, else ``./data``."""
    return os.environ.get("COOP_DATA_ROOT", "data")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one CoOp training run on the platform.

    dataset: registry key (``coop_core.datasets.list_datasets()``). data_root: folder holding ``<dataset_dir>/``;
    it must be readable at this path on every node. model / prompt / train: the core configs (``train.batch_size``
    is the *global* batch, split over workers). num_workers: Ray Train workers (DDP world size). use_gpu: one GPU per
    worker. cache_dir: feature and few-shot cache shared by all workers and trials. max_test_items: evaluate on a
    deterministic, class-balanced subset of this many test items (quick runs); None = the full test split.
    cpus_per_worker: CPUs reserved per worker (torch uses that many threads). download: fetch the dataset on the
    driver first if missing (workers never download).
    """

    dataset: str
    data_root: str
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    num_workers: int = 1
    use_gpu: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    max_test_items: int | None = None
    cpus_per_worker: float = 1.0
    download: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in list_datasets():
            raise ValueError(f"unknown dataset {self.dataset!r}; available: {', '.join(list_datasets())}")
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"RunSpec.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            raise ValueError(f"num_workers (Ray Train workers) must be a positive integer, got {self.num_workers!r}")
        if not isinstance(self.use_gpu, bool):
            raise ValueError(f"use_gpu must be a bool, got {self.use_gpu!r}")
        if self.max_test_items is not None and (not isinstance(self.max_test_items, int) or self.max_test_items < 1):
            raise ValueError(f"max_test_items must be a positive integer or None (full test split), "
                             f"got {self.max_test_items!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.train.precision == "amp" and not self.use_gpu:
            raise ValueError("precision 'amp' (fp16 + loss scaling) needs GPUs; use 'bf16' or 'fp32' on CPU")
        if not self.cache_dir:
            raise ValueError("cache_dir must be a directory path")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested ``model``/``prompt``/``train``); inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Raises:
            ValueError: unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RunSpec keys {sorted(unknown)}; expected {sorted(known)}")
        kwargs = dict(d)
        for name, section_cls in _SECTIONS.items():
            if name in kwargs and isinstance(kwargs[name], Mapping):
                kwargs[name] = _build_section(section_cls, kwargs[name], name)
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunSpec:
        """A copy with fields replaced, e.g. ``{"train.lr": 0.01, "prompt.n_ctx": 4}`` (validated).

        Keys are ``section.field`` (``model``, ``prompt``, ``train``), a top-level field (``num_workers``), or a bare
        field name that exists in exactly one place (``lr``, ``n_ctx``, ``csc``). ``num_workers`` means Ray workers;
        the data-loader count is ``train.num_workers``.

        Raises:
            ValueError: unknown or ambiguous keys, or values the configs reject.
        """
        top = {f.name for f in dataclasses.fields(self)} - set(_SECTIONS)
        section_fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()}
        changes: dict[str, Any] = {}
        per_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in overrides.items():
            if "." in key:
                section, _, name = key.partition(".")
                if section not in _SECTIONS or name not in section_fields[section]:
                    raise ValueError(f"unknown override {key!r}; sections are {sorted(_SECTIONS)} with fields "
                                     + "; ".join(f"{s}: {sorted(f)}" for s, f in section_fields.items()))
                per_section[section][name] = value
            elif key in top:
                changes[key] = value
            else:
                owners = [s for s, names in section_fields.items() if key in names]
                if len(owners) != 1:
                    what = "ambiguous" if owners else "unknown"
                    raise ValueError(f"{what} override {key!r}; use section.field (e.g. train.lr) or one of "
                                     f"{sorted(top)}")
                per_section[owners[0]][key] = value
        for section, values in per_section.items():
            if values:
                try:
                    changes[section] = dataclasses.replace(getattr(self, section), **values)
                except TypeError as err:
                    raise ValueError(f"invalid {section} override {values}: {err}") from None
        return dataclasses.replace(self, **changes)

    def resolved_config(self) -> dict[str, Any]:
        """The run's full resolved configuration (written as ``config.json`` and logged as MLflow params)."""
        d = self.to_dict()
        d["shots"] = self.train.shots
        d["seed"] = self.train.seed
        d["train"]["epochs"] = self.train.resolved_epochs
        return d


def _build_section(cls: type, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {name} keys {sorted(unknown)}; expected {sorted(known)}")
    return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------------------


def subset_test_items(items: Sequence[Item], cap: int | None) -> tuple[Item, ...]:
    """A deterministic, class-balanced subset of at most ``cap`` items (all of them when ``cap`` is None).

    Items are ordered by (label, path) and taken at evenly spaced positions, so every class keeps its share.
    """
    if cap is None or cap >= len(items):
        return tuple(items)
    ordered = sorted(items, key=lambda it: (it.label, it.path))
    return tuple(ordered[i * len(ordered) // cap] for i in range(cap))


def _load_splits(spec: RunSpec, *, download: bool) -> DatasetSplits:
    splits = load_dataset(spec.dataset, spec.data_root, download=download)
    if spec.max_test_items is not None:
        splits = dataclasses.replace(splits, test=subset_test_items(splits.test, spec.max_test_items))
    return splits


def _worker_logging(rank: int, level: str) -> None:
    """Rank 0 prints its progress lines to stderr (Ray forwards worker stderr to the driver's console); other ranks
    and chatty libraries (open_clip logs through the root logger) only show warnings unless ``level`` is lower."""
    logging.getLogger().setLevel(level)
    for name in (__name__, "coop_core"):
        lg = logging.getLogger(name)
        if rank == 0 and not any(getattr(h, "_coop_worker", False) for h in lg.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._coop_worker = True  # type: ignore[attr-defined]
            lg.addHandler(handler)
            lg.propagate = False
        lg.setLevel(logging.INFO if rank == 0 else level)
    logging.getLogger("coop_core.engine").setLevel(logging.WARNING)  # rank 0 prints its own epoch line


def _format_epoch(metrics: Mapping[str, float], epochs: int) -> str:
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}", f"loss {metrics['train_loss']:.4f}",
             f"train_acc {metrics['train_acc']:.2f}", f"lr {metrics['lr']:.3g}"]
    if "val_acc" in metrics:
        parts.append(f"val_acc {metrics['val_acc']:.2f}")
    if "test_acc" in metrics:
        parts.append(f"test_acc {metrics['test_acc']:.2f}")
    parts.append(f"{metrics['epoch_time_s']:.2f}s")
    return " | ".join(parts)


def _read_checkpoint(checkpoint: Any) -> tuple[TrainState, list[dict[str, float]]]:
    with checkpoint.as_directory() as d:
        state = TrainState.from_dict(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True))
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
    return state, history


def _maybe_fail(config: Mapping[str, Any], epoch: int, rank: int) -> None:
    """Test-only fault injection: ``config["_fail_once"] = {"epoch", "rank", "flag_file"}`` raises once."""
    fail = config.get("_fail_once")
    if not fail or epoch != fail["epoch"] or rank != fail.get("rank", 0):
        return
    flag = Path(fail["flag_file"])
    if flag.exists():
        return
    flag.write_text(f"failed at epoch {epoch} on rank {rank}\n")
    raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank} (test fault injection)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one shard of a CoOp run (see the module docstring).

    Args:
        config: ``{"spec": RunSpec.to_dict()}``, plus optional ``"overrides"`` (see :meth:`RunSpec.with_overrides`).
    """
    import ray.train

    t_start = time.perf_counter()
    spec = RunSpec.from_dict(config["spec"])
    if config.get("overrides"):
        spec = spec.with_overrides(config["overrides"])
    dist = TorchDistributed.from_ray_train()  # (1) Ray: rank and world size of the torch process group
    rank = dist.rank
    _worker_logging(rank, config.get("log_level", "WARNING"))
    if spec.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    cfg = spec.train
    epochs = cfg.resolved_epochs

    clip = load_clip(spec.model.backbone, spec.model.pretrained, device=device)
    splits = _load_splits(spec, download=False)
    fewshot = build_few_shot(splits, cfg.shots, cfg.seed, spec.cache_dir)
    feats = prepare_features(clip, splits, fewshot, cfg, cache_dir=spec.cache_dir, device=device,
                             with_test=rank == 0)
    model = build_model(clip, splits.classnames, spec.prompt, cfg.seed, device)
    setup_s = time.perf_counter() - t_start

    resume, history = None, []
    checkpoint = ray.train.get_checkpoint()  # (2) Ray: the last checkpoint when restarted after a failure
    if checkpoint is not None:
        resume, history = _read_checkpoint(checkpoint)
        history = [row for row in history if row["epoch"] <= resume.epoch]
        logger.info("resuming from the checkpoint after epoch %d/%d", resume.epoch, epochs)
    elif rank == 0:
        logger.info("training %s: %d-shot, %d epochs, %d worker(s) on %s, %d train / %d val / %d test items",
                    spec.dataset, cfg.shots, epochs, dist.world_size, device, len(fewshot.train), len(fewshot.val),
                    len(splits.test))

    resolved = spec.resolved_config() | {
        "world_size": dist.world_size, "classnames": list(splits.classnames), "template": splits.template,
        "n_train": len(fewshot.train), "n_val": len(fewshot.val), "n_test": len(splits.test),
        "n_ctx_effective": model.prompt_learner.ctx.shape[-2],
        "fewshot_manifest": str(fewshot.manifest_path) if fewshot.manifest_path else None,
        "resumed_from_epoch": resume.epoch if resume is not None else None,
    }
    train_loop_s = sum(row.get("epoch_time_s", 0.0) for row in history)

    def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
        nonlocal train_loop_s
        train_loop_s += metrics["epoch_time_s"]
        final = int(metrics["epoch"]) == epochs
        if final and rank == 0:
            test = evaluate(model, feats.test, cfg.precision)
            zs = zeroshot_evaluate(clip.model, clip.tokenizer, splits.classnames, splits.template, feats.test)
            metrics.update(test_acc=test["acc"], test_macro_f1=test["macro_f1"], zeroshot_test_acc=zs["acc"],
                           zeroshot_test_macro_f1=zs["macro_f1"], setup_s=setup_s, train_loop_s=train_loop_s,
                           worker_wall_s=time.perf_counter() - t_start)
        history.append(dict(metrics))
        if rank != 0:
            ray.train.report(dict(metrics))  # (3) Ray: every worker reports; only rank 0 carries the checkpoint
        else:
            with tempfile.TemporaryDirectory() as tmp:
                d = Path(tmp)
                torch.save(state.to_dict(), d / STATE_FILE)
                (d / HISTORY_FILE).write_text(json.dumps(history, indent=1))
                (d / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True))
                if final:
                    _write_final_artifacts(d, spec, clip, splits, model, metrics)
                ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
            logger.info("%s", _format_epoch(metrics, epochs))
        _maybe_fail(config, int(metrics["epoch"]), rank)

    train(model, feats.train, cfg, val=feats.val, dist=dist, on_epoch_end=on_epoch_end, resume=resume)


def _write_final_artifacts(d: Path, spec: RunSpec, clip: Any, splits: DatasetSplits, model: Any,
                           metrics: Mapping[str, float]) -> None:
    """The learned prompts (+ JSON), the nearest-words table and the final metrics, next to the last state."""
    ctx = model.prompt_learner.ctx.detach().cpu()
    prompt = dataclasses.replace(spec.prompt, n_ctx=ctx.shape[-2])  # ctx_init's word count wins over n_ctx
    extra = {"dataset": spec.dataset, "shots": str(spec.train.shots), "seed": str(spec.train.seed),
             "model_name": clip.model_name, "template": splits.template,
             **{k: f"{metrics[k]:.4f}" for k in ("val_acc", "test_acc", "zeroshot_test_acc") if k in metrics}}
    meta = PromptMeta(backbone=spec.model.backbone, pretrained=spec.model.pretrained, classnames=splits.classnames,
                      prompt=prompt, extra=extra)
    save_prompts(d / PROMPTS_FILE, ctx, meta)
    words = nearest_words(ctx, text_tower(clip.model).token_embedding, clip.tokenizer)
    (d / NEAREST_WORDS_FILE).write_text(nearest_words_table(words, list(splits.classnames)) + "\n")
    (d / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------


def init_ray(address: str | None = None, *, working_dir: bool = True, **ray_init_kwargs: Any) -> bool:
    """``ray.init`` with the ``runtime_env`` that makes ``platform.*`` importable in every worker.

    Ships the repository as ``working_dir`` and installs this package in each worker with a setup hook (see
    ``platform/_compat.py``). Does nothing if Ray was already started this way.

    Args:
        address: a cluster address (``auto``, ``ray://head:10001``) or None for a local instance.
        working_dir: ship the repository to the cluster (off: workers on this machine import it in place).
        ray_init_kwargs: passed to ``ray.init`` (``num_cpus``, ``num_gpus``, ``include_dashboard``...); a
            ``runtime_env`` is merged into ours (its ``env_vars`` added).

    Returns:
        True when this call started (or connected) Ray, False when it was already running.

    Raises:
        RuntimeError: Ray is already initialised without this runtime environment.
    """
    from platform._compat import ROOT_ENV_VAR, ray_runtime_env

    import ray

    if ray.is_initialized():
        if ROOT_ENV_VAR not in (ray.get_runtime_context().runtime_env.get("env_vars") or {}):
            raise RuntimeError("Ray was initialised without platform.train.init_ray(): its workers cannot import "
                               "the `platform` package; call init_ray() instead of ray.init()")
        return False
    runtime_env = ray_runtime_env(working_dir=working_dir)
    extra_env = ray_init_kwargs.pop("runtime_env", None) or {}
    runtime_env["env_vars"] = {**runtime_env["env_vars"], **extra_env.pop("env_vars", {})}
    runtime_env.update(extra_env)
    ray_init_kwargs.setdefault("logging_level", logging.WARNING)
    # Ray warns on every start that .git/.venv are no longer uploaded -- which is what we want; keep the console clean.
    logging.getLogger("ray._private.worker").addFilter(
        lambda record: "is now ignored by default" not in record.getMessage())
    ray.init(address=address, runtime_env=runtime_env, **ray_init_kwargs)
    return True


def resolve_use_gpu(value: str | bool) -> bool:
    """``yes``/``no``/``auto`` -> bool; ``auto``: does the Ray cluster (call after :func:`init_ray`) have GPUs?"""
    if isinstance(value, bool):
        return value
    value = value.lower()
    if value in ("yes", "true", "1"):
        return True
    if value in ("no", "false", "0"):
        return False
    if value != "auto":
        raise ValueError(f"use_gpu must be auto, yes or no, got {value!r}")
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


def build_trainer(
    spec: RunSpec,
    *,
    storage_path: str,
    name: str,
    run_config_callbacks: Sequence[Any] | None = None,
    max_failures: int = 2,
    extra_config: Mapping[str, Any] | None = None,
    num_to_keep: int | None = 2,
    log_level: str = "WARNING",
) -> Any:
    """A Ray Train ``TorchTrainer`` for ``spec`` (DDP over ``spec.num_workers`` workers).

    Args:
        spec: the run.
        storage_path: where Ray Train persists checkpoints (a shared path or ``s3://`` URI on multi-node clusters).
        name: the run's folder name under ``storage_path``.
        run_config_callbacks: Ray Train ``UserCallback``s, e.g. ``ray.tune.integration.ray_train.TuneReportCallback()``
            to forward each epoch's report to Ray Tune.
        max_failures: worker failures to recover from (restarting from the last checkpoint).
        extra_config: extra ``train_loop_config`` entries (``"overrides"``, or test-only ``"_fail_once"``).
        num_to_keep: checkpoints to keep (each holds the whole metric history; None keeps all).
        log_level: Ray Train's and the workers' console log level (rank 0's progress lines are always shown).

    Returns:
        The trainer; ``trainer.fit()`` returns a ``ray.train.Result`` whose ``checkpoint`` is the final one.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "log_level": log_level, **(extra_config or {})},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=list(run_config_callbacks) if run_config_callbacks else None,
            logging_config=LoggingConfig(log_level=log_level),
        ),
    )


def _abspath_if_exists(value: str) -> str:
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, backbone, prompt, recipe and worker flags shared by ``platform.train`` and ``platform.tune``."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=list_datasets(), metavar="NAME",
                      help=f"dataset registry key: {', '.join(list_datasets())}")
    data.add_argument("--data-root", default=default_data_root(),
                      help="folder holding <dataset>/ as in CoOp's DATASETS.md, e.g. <root>/eurosat/2750 "
                           "(default: $COOP_DATA_ROOT or ./data); must exist at this path on every Ray node")
    data.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    data.add_argument("--shots", type=int, default=16, help="training images per class (default: 16)")
    data.add_argument("--seed", type=int, default=1, help="few-shot sampling and initialisation seed (default: 1)")
    data.add_argument("--max-test-items", type=int, default=None,
                      help="evaluate on a class-balanced subset of this many test items (quick runs; default: all)")
    data.add_argument("--cache-dir", default=default_cache_dir(),
                      help="feature/few-shot cache shared by all workers and trials (default: $COOP_CACHE_DIR, "
                           "~/.cache/coop, or ./.cache/coop)")
    model = parser.add_argument_group("backbone")
    model.add_argument("--backbone", default="ViT-B-16",
                       help="open_clip architecture (ViT-B-16, RN50, ...) or a path to an open_clip model-config JSON")
    model.add_argument("--pretrained", default="openai",
                       help="open_clip pretrained tag (needs internet once), a local checkpoint path, or 'none' "
                            "for random weights (offline smoke runs)")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--n-ctx", type=int, default=16, help="number of learnable context vectors (default: 16)")
    prompt.add_argument("--ctx-init", default="",
                        help="initialise the context from these words, e.g. 'a photo of a' (overrides --n-ctx)")
    prompt.add_argument("--class-token-position", default="end", choices=CLASS_TOKEN_POSITIONS,
                        help="class name after (end), inside (middle) or before (front) the context")
    prompt.add_argument("--csc", action="store_true", help="class-specific context instead of one shared context")
    recipe = parser.add_argument_group("training recipe")
    recipe.add_argument("--epochs", type=int, default=None,
                        help="epochs (default: CoOp's schedule: 1 shot 50, 2-4 shots 100, 8-16 shots 200)")
    recipe.add_argument("--lr", type=float, default=0.002, help="SGD learning rate (default: 0.002)")
    recipe.add_argument("--warmup-epochs", type=int, default=1,
                        help="epochs at a constant 1e-5 before the cosine schedule (default: 1)")
    recipe.add_argument("--batch-size", type=int, default=32,
                        help="GLOBAL batch size, split across workers (default: 32)")
    recipe.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32, bf16 autocast, or amp (fp16 + loss scaling, GPUs only)")
    recipe.add_argument("--feature-mode", default="cached", choices=FEATURE_MODES,
                        help="cached: train on pre-computed augmented views; exact: encode fresh augmentations "
                             "every step (reference compute, much slower)")
    recipe.add_argument("--n-views", type=int, default=10, help="augmented views per image in cached mode")
    recipe.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader processes per worker for feature extraction (default: 0)")
    workers = parser.add_argument_group("workers")
    workers.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP processes; default: 1)")
    workers.add_argument("--use-gpu", default="auto", choices=("auto", "yes", "no"),
                         help="one GPU per worker: auto = if the Ray cluster has GPUs (default: auto)")
    workers.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: 1)")


def spec_from_args(args: argparse.Namespace, *, use_gpu: bool | None = None) -> RunSpec:
    """Build a :class:`RunSpec` from :func:`add_run_arguments` flags; paths are made absolute for the workers.

    Args:
        args: parsed flags.
        use_gpu: the resolved ``--use-gpu`` (pass ``resolve_use_gpu(args.use_gpu)`` after :func:`init_ray`); None
            resolves it now.

    Raises:
        ValueError: invalid values (the message names the flag's field and what is allowed).
    """
    if use_gpu is None:
        use_gpu = resolve_use_gpu(args.use_gpu)
    return RunSpec(
        dataset=args.dataset,
        data_root=str(Path(args.data_root).expanduser().resolve()),
        model=ModelConfig(backbone=_abspath_if_exists(args.backbone), pretrained=_abspath_if_exists(args.pretrained)),
        prompt=PromptConfig(n_ctx=args.n_ctx, ctx_init=args.ctx_init, csc=args.csc,
                            class_token_position=args.class_token_position),
        train=TrainConfig(shots=args.shots, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, warmup_epochs=args.warmup_epochs, precision=args.precision,
                          feature_mode=args.feature_mode, n_views=args.n_views, num_workers=args.loader_workers),
        num_workers=args.num_workers,
        use_gpu=use_gpu,
        cache_dir=str(Path(args.cache_dir).expanduser().resolve()),
        max_test_items=args.max_test_items,
        cpus_per_worker=args.cpus_per_worker,
        download=args.download,
    )


def hub_unreachable_use_cache(spec: RunSpec, timeout_s: float = 5.0) -> bool:
    """Switch ``huggingface_hub`` to offline (cache-only) mode when the weights come from an unreachable Hub.

    ``huggingface_hub`` retries a failed request five times with back-off, so an offline download attempt takes about
    a minute before ``coop_core`` can say "no weights". One short TCP probe decides instead: unreachable -> offline
    mode, in which cached weights load at once and missing ones fail at once with ``WeightsUnavailableError``.

    Returns:
        True when offline mode was switched on (pass ``HF_HUB_OFFLINE=1`` to the workers too).
    """
    import socket
    from urllib.parse import urlparse

    if spec.model.pretrained.lower() in NO_WEIGHTS or os.path.isfile(spec.model.pretrained):
        return False
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return False
    except OSError:
        logger.debug("%s is unreachable: using cached pretrained weights only", url.hostname)
        hub.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub.is_offline_mode()
        return True


def check_inputs(spec: RunSpec) -> DatasetSplits:
    """Fail fast on the driver, before Ray starts: the backbone, the data and the weights (a short download).

    Raises:
        ValueError / FileNotFoundError: bad backbone name or config path.
        coop_core.datasets.DatasetNotFoundError: the dataset is not under the data root.
        coop_core.backbone.WeightsUnavailableError: weights cannot be obtained (offline and not cached).
    """
    resolve_model_name(spec.model.backbone)
    splits = _load_splits(spec, download=spec.download)
    if spec.model.pretrained.lower() not in NO_WEIGHTS:
        load_clip(spec.model.backbone, spec.model.pretrained)  # downloads into the open_clip cache, or fails fast
    return splits


def add_infra_arguments(parser: argparse.ArgumentParser) -> None:
    """Ray cluster, storage and MLflow flags (shared with ``platform.tune``)."""
    infra = parser.add_argument_group("cluster and tracking")
    infra.add_argument("--ray-address", default=None,
                       help="Ray cluster to join (e.g. 'auto' on a cluster node); default: start a local Ray")
    infra.add_argument("--storage-path", default=str(Path("ray_results").resolve()),
                       help="where Ray Train keeps checkpoints; a shared path or s3:// on multi-node clusters "
                            "(default: ./ray_results)")
    infra.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    infra.add_argument("--experiment", default=None, help="MLflow experiment (default: coop-<dataset>)")
    infra.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    infra.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the libraries' INFO logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m platform.train",
        description="Train CoOp prompts for CLIP on one dataset with Ray Train (DDP across --num-workers), track the "
                    "run in MLflow and save the learned prompts.",
        epilog="Example (offline smoke run): python -m platform.train --dataset eurosat --data-root ../shared/data "
               "--backbone tests/fixtures/tiny-vit.json --pretrained none --shots 2 --epochs 3 --num-workers 2\n"
               "Then: mlflow ui --backend-store-uri sqlite:///mlflow.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker failures to recover from, restarting at the last checkpoint (default: 2)")
    add_infra_arguments(parser)
    return parser


class StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted.

    A plain ``StreamHandler(sys.stderr)`` keeps the stream of the moment it was made; when the CLI's ``main`` runs more
    than once in a process (tests, notebooks) that stream may since have been replaced and closed.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    """Our progress on stderr; other libraries' INFO only with --verbose (their warnings reach stderr anyway)."""
    for name in ("platform", "coop_core"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, StderrHandler) for h in lg.handlers):
            lg.addHandler(StderrHandler())
        lg.setLevel(logging.INFO)
        lg.propagate = False
    if verbose and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human table printed at the end of a run."""
    def pct(key: str) -> str:
        v = summary.get(key)
        return f"{v:6.2f}" if isinstance(v, (int, float)) else "     -"

    lines = [
        "",
        f"CoOp on {summary['dataset']} ({summary['shots']}-shot, seed {summary['seed']}, {summary['backbone']}, "
        f"{summary['epochs']} epochs, {summary['num_workers']} worker(s))",
        "                      acc %   macro-F1 %",
        f"  val (few-shot)     {pct('val_acc')}   {pct('val_macro_f1')}",
        f"  test (CoOp)        {pct('test_acc')}   {pct('test_macro_f1')}",
        f"  test (zero-shot)   {pct('zeroshot_test_acc')}   {pct('zeroshot_test_macro_f1')}",
        "",
        f"  MLflow run      {summary['run_id']}  (experiment {summary['experiment']!r})",
        f"  prompts         {summary['prompts']}",
        f"  wall time       {summary['wall_s']:.1f}s (training loop {summary.get('train_loop_s', 0.0):.1f}s)",
        f"  open the UI     {summary['ui_command']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 training failed, 2 bad input / data / weights)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    t0 = time.perf_counter()
    try:
        # --use-gpu auto is resolved once Ray is up; until then assume GPUs may exist (so 'amp' is not refused yet).
        spec = spec_from_args(args, use_gpu=args.use_gpu != "no")
        offline = hub_unreachable_use_cache(spec)
        check_inputs(spec)
    except (DatasetNotFoundError, WeightsUnavailableError, ValueError, FileNotFoundError) as err:
        return _fail(str(err))

    from platform import tracking

    started_ray = init_ray(args.ray_address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}} if offline else None)
    try:
        use_gpu = resolve_use_gpu(args.use_gpu)
        if args.use_gpu == "yes" and not resolve_use_gpu("auto"):
            raise ValueError("--use-gpu yes, but the Ray cluster has no GPUs; use --use-gpu no or auto")
        spec = dataclasses.replace(spec, use_gpu=use_gpu)
    except ValueError as err:
        return _fail(str(err))

    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    experiment = args.experiment or tracking.default_experiment(spec.dataset)
    name = f"coop-{spec.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_id = tracking.create_run(experiment, run_name=name, tracking_uri=tracking_uri,
                                 tags={"coop.entry_point": "platform.train"})
    tracking.log_params(run_id, spec, tracking_uri=tracking_uri)
    logger.info("MLflow run %s (experiment %r, %s)", run_id, experiment, tracking_uri)
    logger.info("starting %d Ray Train worker(s) (%s); checkpoints under %s/%s", spec.num_workers,
                "GPU" if spec.use_gpu else "CPU", args.storage_path, name)
    try:
        trainer = build_trainer(spec, storage_path=args.storage_path, name=name, max_failures=args.max_failures,
                                log_level="INFO" if args.verbose else "WARNING")
        result = trainer.fit()
    except KeyboardInterrupt:
        tracking.end_run(run_id, "KILLED", tracking_uri=tracking_uri)
        sys.stderr.write(f"interrupted (MLflow run {run_id} marked KILLED)\n")
        return 130
    except Exception as err:  # Ray Train wraps worker errors in TrainingFailedError
        tracking.end_run(run_id, "FAILED", tracking_uri=tracking_uri)
        sys.stderr.write(f"error: training failed ({type(err).__name__}): {str(err).strip().splitlines()[0]}\n"
                         f"(MLflow run {run_id} marked FAILED; worker logs are above)\n")
        return 1
    with result.checkpoint.as_directory() as ckpt_dir:
        final = tracking.log_checkpoint(run_id, ckpt_dir, tracking_uri=tracking_uri)
    wall_s = time.perf_counter() - t0
    tracking.log_final_metrics(run_id, {"wall_s": wall_s}, step=spec.train.resolved_epochs, tracking_uri=tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    if started_ray:
        import ray

        ray.shutdown()  # stops forwarding worker logs, so nothing can follow the summary on stdout

    summary: dict[str, Any] = {
        "run_id": run_id, "experiment": experiment, "tracking_uri": tracking_uri, "dataset": spec.dataset,
        "shots": spec.train.shots, "seed": spec.train.seed, "backbone": spec.model.backbone,
        "epochs": spec.train.resolved_epochs, "num_workers": spec.num_workers, "use_gpu": spec.use_gpu,
        **{k: final[k] for k in ("val_acc", "val_macro_f1", *FINAL_METRICS, "train_loss", "setup_s", "train_loop_s",
                                 "worker_wall_s") if k in final},
        "checkpoint": result.checkpoint.path,
        "prompts": str(Path(result.checkpoint.path) / PROMPTS_FILE),
        "wall_s": wall_s,
        "ui_command": tracking.ui_command(tracking_uri),
    }
    print(format_summary(summary))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray then pickles train_loop_per_worker by reference
    # (platform.train) instead of by value, and log records carry the "platform.train" logger name.
    from platform.train import main as _main

    sys.exit(_main())
