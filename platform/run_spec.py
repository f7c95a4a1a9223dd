"""The run spec: everything that defines one CoOp training run on the platform, frozen and validated.

A :class:`RunSpec` is built once from the CLI flags (``platform/cli.py``), travels to Ray workers and Tune trials as
``to_dict()`` JSON, and is rebuilt there with ``from_dict``; a sweep's trial is the sweep's spec with the trial's
searched values applied by :meth:`RunSpec.with_overrides`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coop_core.config import MethodConfig, ModelConfig, PromptConfig, TrainConfig, check_method_prompt
from coop_core.datasets import (
    CLASS_SUBSETS,
    DatasetSplits,
    FolderSource,
    Item,
    list_datasets,
    load_dataset,
    load_folder_dataset,
    select_classes,
)

_SECTIONS = {"model": ModelConfig, "prompt": PromptConfig, "train": TrainConfig, "method": MethodConfig}
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies
# A checkpoint every epoch costs more than the epoch itself on cached features (a few milliseconds of training, a
# state file, a manifest and Ray's checkpoint bookkeeping): long runs checkpoint about this many times.
MAX_AUTO_CHECKPOINTS = 20


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
class DatasetRef:
    """A dataset a run reads, and which of its classes: a registry entry (under the run's data root) or a user's
    image folder / manifest.

    name: the registry key, or the user dataset's name (``source.name``). source: the user's folder or manifest
    (None: the registry entry ``name``). classes: ``all``, or CoCoOp's ``base`` (the first half of the sorted labels)
    or ``new`` (the rest).
    """

    name: str
    source: FolderSource | None = None
    classes: str = "all"

    def __post_init__(self) -> None:
        if self.source is None and self.name not in list_datasets():
            raise ValueError(f"unknown dataset {self.name!r}; available: {', '.join(list_datasets())}, or a path "
                             "to an image folder or a CSV/Parquet manifest")
        if self.source is not None and (not isinstance(self.source, FolderSource) or self.source.name != self.name):
            raise ValueError(f"DatasetRef {self.name!r}: source must be a FolderSource named {self.name!r}")
        if self.classes not in CLASS_SUBSETS:
            raise ValueError(f"classes must be one of {', '.join(CLASS_SUBSETS)}, got {self.classes!r}")

    @property
    def label(self) -> str:
        """How results on this dataset are named: ``eurosat``, ``eurosat.new`` (a class subset)."""
        return self.name if self.classes == "all" else f"{self.name}.{self.classes}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetRef:
        source = d.get("source")
        return cls(name=d["name"], source=FolderSource(**source) if isinstance(source, Mapping) else source,
                   classes=d.get("classes", "all"))

    def load(self, data_root: str, cache_dir: str | None, *, download: bool = False,
             max_test_items: int | None = None) -> DatasetSplits:
        """The dataset's splits: its class subset, and its test split cut to ``max_test_items``."""
        if self.source is not None:
            splits = load_folder_dataset(self.source, cache_dir)
        else:
            splits = load_dataset(self.name, data_root, download=download)
        splits = select_classes(splits, self.classes)
        if max_test_items is not None:
            splits = dataclasses.replace(splits, test=subset_test_items(splits.test, max_test_items))
        return splits


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one CoOp training run on the platform.

    dataset: registry key (``coop_core.datasets.list_datasets()``). data_root: folder holding ``<dataset_dir>/``;
    it must be readable at this path on every node. model / prompt / train / method: the core configs (method: CoOp
    or a successor, ``coop_core.methods``) (``train.batch_size``
    is the *global* batch, split over workers). num_workers: Ray Train workers (DDP world size). use_gpu: one GPU per
    worker. cache_dir: feature and few-shot cache shared by all workers and trials. max_test_items: evaluate on a
    deterministic, class-balanced subset of this many test items (quick runs); None = the full test split.
    cpus_per_worker: CPUs reserved per worker (torch uses that many threads). placement_strategy: how Ray places a
    multi-worker run's workers (``PACK``: on as few nodes as fit, the fastest all-reduce; ``SPREAD``: on different
    nodes where possible; ``STRICT_`` variants fail instead of falling back). download: fetch the dataset on the
    driver first if missing (workers never download). checkpoint_every: epochs between checkpoints (None: see
    :meth:`checkpoint_interval`); a restarted run resumes from the last one and recomputes the epochs after it, which
    give the same results. source: the user's image folder or manifest when ``dataset``
    is not a registry key (then ``dataset`` is its name). classes: train (and test) on ``all`` classes, or on
    CoCoOp's ``base`` / ``new`` half. eval_targets: more datasets (or class subsets) the final prompts are tested on
    after training, each reported as ``target/<label>/...`` metrics (base-to-new, domain generalisation and
    cross-dataset protocols).
    """

    dataset: str
    data_root: str
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    num_workers: int = 1
    use_gpu: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    max_test_items: int | None = None
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    download: bool = False
    checkpoint_every: int | None = None
    source: FolderSource | None = None
    classes: str = "all"
    eval_targets: tuple[DatasetRef, ...] = ()

    def __post_init__(self) -> None:
        DatasetRef(self.dataset, self.source, self.classes)  # validates the three together
        if isinstance(self.eval_targets, (str, bytes)) or not isinstance(self.eval_targets, Sequence) or not all(
                isinstance(t, DatasetRef) for t in self.eval_targets):
            raise ValueError("eval_targets must be a sequence of DatasetRef")
        object.__setattr__(self, "eval_targets", tuple(self.eval_targets))
        labels = [t.label for t in self.eval_targets]
        if len(set(labels)) != len(labels) or self.data_ref.label in labels:
            raise ValueError(f"eval_targets must be distinct datasets other than the training data, got {labels}")
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"RunSpec.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        check_method_prompt(self.method, self.prompt)
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            raise ValueError(f"num_workers (Ray Train workers) must be a positive integer, got {self.num_workers!r}")
        if not isinstance(self.use_gpu, bool):
            raise ValueError(f"use_gpu must be a bool, got {self.use_gpu!r}")
        if self.max_test_items is not None and (not isinstance(self.max_test_items, int) or self.max_test_items < 1):
            raise ValueError(f"max_test_items must be a positive integer or None (full test split), "
                             f"got {self.max_test_items!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.train.precision == "amp" and not self.use_gpu:
            raise ValueError("precision 'amp' (fp16 + loss scaling) needs GPUs; use 'bf16' or 'fp32' on CPU")
        if not self.cache_dir:
            raise ValueError("cache_dir must be a directory path")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or isinstance(self.checkpoint_every, bool)
                                                  or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive number of epochs or None (automatic), got "
                             f"{self.checkpoint_every!r}")

    def checkpoint_interval(self) -> int:
        """Epochs between checkpoints: ``checkpoint_every``, or automatically every epoch for runs of up to
        :data:`MAX_AUTO_CHECKPOINTS` epochs and about that many per run beyond (the last epoch always has one)."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(1, math.ceil(self.train.resolved_epochs / MAX_AUTO_CHECKPOINTS))

    @property
    def data_ref(self) -> DatasetRef:
        """The training data as a :class:`DatasetRef`."""
        return DatasetRef(self.dataset, self.source, self.classes)

    @property
    def model_key(self) -> str:
        """What the registered model is named after: the dataset, and its class subset if not all
        (``coop-eurosat``, ``coop-eurosat-base``)."""
        return self.dataset if self.classes == "all" else f"{self.dataset}-{self.classes}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested ``model``/``prompt``/``train``); inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        d["eval_targets"] = [t.to_dict() for t in self.eval_targets]
        return d

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
        if isinstance(kwargs.get("source"), Mapping):
            kwargs["source"] = FolderSource(**kwargs["source"])
        if "eval_targets" in kwargs:
            kwargs["eval_targets"] = tuple(t if isinstance(t, DatasetRef) else DatasetRef.from_dict(t)
                                           for t in kwargs["eval_targets"])
        return cls(**kwargs)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunSpec:
        """A copy with fields replaced, e.g. ``{"train.lr": 0.01, "prompt.n_ctx": 4}`` (validated).

        Keys are ``section.field`` (``model``, ``prompt``, ``train``, ``method``), a top-level field (``num_workers``),
        or a bare field name that exists in exactly one place (``lr``, ``n_ctx``, ``csc``).

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
        d["model_key"] = self.model_key
        return d


def _build_section(cls: type, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {name} keys {sorted(unknown)}; expected {sorted(known)}")
    return cls(**values)


def subset_test_items(items: Sequence[Item], cap: int | None) -> tuple[Item, ...]:
    """A deterministic, class-balanced subset of at most ``cap`` items (all of them when ``cap`` is None).

    Items are ordered by (label, path) and taken at evenly spaced positions, so every class keeps its share.
    """
    if cap is None or cap >= len(items):
        return tuple(items)
    ordered = sorted(items, key=lambda it: (it.label, it.path))
    return tuple(ordered[i * len(ordered) // cap] for i in range(cap))


def load_splits(spec: RunSpec, *, download: bool = False) -> DatasetSplits:
    """The spec's training dataset (its class subset, its test split cut to ``max_test_items``); workers never
    download."""
    return spec.data_ref.load(spec.data_root, spec.cache_dir, download=download, max_test_items=spec.max_test_items)


def load_target_splits(spec: RunSpec, target: DatasetRef) -> DatasetSplits:
    """One of the spec's evaluation targets (its test split cut to ``max_test_items`` like the training data's)."""
    return target.load(spec.data_root, spec.cache_dir, max_test_items=spec.max_test_items)
