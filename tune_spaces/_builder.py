"""Search-space building blocks: plain, frozen parameter domains and the generic CoOp space for a template.

A space is a dict keyed by config field names (``"prompt.n_ctx"``, ``"train.lr"``, ...) whose values are
:class:`Choice` or :class:`LogUniform`. They are plain data: nothing here imports Ray or Optuna. The sweep
(``platform/tune.py``) turns them into Ray Tune domains; tests sample them with a local ``random.Random`` and build the
configs from each sample with :func:`split_sample`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from coop_core.config import CLASS_TOKEN_POSITIONS

# Config sections a space may key into, and the dataclass each one builds.
SECTIONS = ("prompt", "train", "method")

PHOTO_WORDS = "a photo of a"  # CoOp's generic hand-crafted context
N_CTX_CHOICES = (4, 8, 16)
LR_RANGE = (5e-4, 2e-2)


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (categorical; Optuna's TPE models it as such)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("Choice needs at least one value")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"Choice values must be distinct, got {self.values!r}")

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.values)


@dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from ``[low, high]``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, got low={self.low}, high={self.high}")

    def sample(self, rng: random.Random) -> float:
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


Domain = Choice | LogUniform
Space = dict[str, Domain]


def template_words(template: str) -> str:
    """The words of a zero-shot template before its ``{}``: ``"a centered satellite photo of {}."`` -> ``"a centered
    satellite photo of"``. Empty when the class name comes first (``"{} texture."``)."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    return " ".join(template.split("{}")[0].replace(",", " ").split())


def ctx_init_choices(template: str) -> tuple[str, ...]:
    """Context initialisations to search: random (``""``), ``"a photo of a"`` and the dataset template's words."""
    options = ["", PHOTO_WORDS]
    words = template_words(template)
    if words and words not in options:
        options.append(words)
    return tuple(options)


def coop_space(template: str) -> Space:
    """The CoOp search space for a dataset with zero-shot ``template``.

    Context length, context initialisation (random, "a photo of a", the template's words), class-token position,
    class-specific context and learning rate. With a word initialisation the core takes the context length from the
    word count, so ``prompt.n_ctx`` only matters for random initialisation; the sweep records the effective value.
    """
    return {
        "prompt.n_ctx": Choice(N_CTX_CHOICES),
        "prompt.ctx_init": Choice(ctx_init_choices(template)),
        "prompt.class_token_position": Choice(CLASS_TOKEN_POSITIONS),
        "prompt.csc": Choice((False, True)),
        "train.lr": LogUniform(*LR_RANGE),
    }


def with_methods(space: Space, methods: tuple[str, ...]) -> Space:
    """``space`` with the prompt learner searched too: ``method.name`` over ``methods`` (two or more; fewer leave the
    space as it is). CoCoOp builds only a unified context with the class name at the end, so when it is among the
    methods the space does not search ``prompt.csc`` or ``prompt.class_token_position`` (they stay at the run's
    values): every point of the space is then a run every method can train."""
    if len(methods) < 2:
        return dict(space)
    out = dict(space)
    if "cocoop" in methods:
        out.pop("prompt.csc", None)
        out.pop("prompt.class_token_position", None)
    out["method.name"] = Choice(tuple(methods))
    return out


def check_space(space: Space) -> Space:
    """Validate a space's keys (``<section>.<field>``) and domains; return it.

    Raises:
        ValueError: A key does not name a field of PromptConfig/TrainConfig/MethodConfig, or a value is not a domain.
    """
    from coop_core.config import MethodConfig, PromptConfig, TrainConfig

    fields = {"prompt": PromptConfig.__dataclass_fields__, "train": TrainConfig.__dataclass_fields__,
              "method": MethodConfig.__dataclass_fields__}
    for key, domain in space.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in fields[section]:
            raise ValueError(
                f"search-space key {key!r} must be '<section>.<field>' with section in {SECTIONS} and a field of "
                "PromptConfig / TrainConfig / MethodConfig"
            )
        if not isinstance(domain, (Choice, LogUniform)):
            raise ValueError(f"search-space value for {key!r} must be a Choice or LogUniform, got {domain!r}")
    return space


def sample_space(space: Space, rng: random.Random) -> dict[str, Any]:
    """One point of ``space`` (flat ``{"prompt.n_ctx": 8, ...}``)."""
    return {key: domain.sample(rng) for key, domain in space.items()}


def split_sample(sample: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"prompt.n_ctx": 8, "train.lr": 0.01}`` -> ``{"prompt": {"n_ctx": 8}, "train": {"lr": 0.01}}``.

    Keys outside :data:`SECTIONS` are ignored (Ray Tune may add its own).
    """
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, value in sample.items():
        section, _, name = key.partition(".")
        if section in out and name:
            out[section][name] = value
    return out
