"""The sweep's settings: which trials run where (grid, trial runner, GPU share, concurrency), checked before Ray
starts."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from platform.artifacts import SELECTION_METRIC
from platform.ray_runtime import USE_GPU_VALUES
from typing import Any

from coop_core.config import METHODS

logger = logging.getLogger(__name__)


METRIC, MODE = SELECTION_METRIC, "max"
TRIAL_RUNNERS = ("auto", "in-process", "ray-train")


# The range checks of the settings, each one message, used by SweepSettings and by the functions that resolve them.
def check_trial_runner(name: str) -> None:
    if name not in TRIAL_RUNNERS:
        raise ValueError(f"--trial-runner must be one of {', '.join(TRIAL_RUNNERS)}, got {name!r}")


def check_gpu_share(value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"--gpus-per-trial must be in (0, 1] (a share of one GPU per trial), got {value}")


def check_pack_size(value: str) -> None:
    if value == "auto":
        return
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"--pack-size must be 'auto' or a whole number >= 1 (configurations trained together per "
                         f"trial; 1: one per trial), got {value!r}")


def resolve_pack_size(requested: str, *, n_configs: int, max_concurrent: int, runner: str,
                      members_that_fit: Callable[[], int]) -> int:
    """Configurations per trial: ``requested``, or for ``auto`` enough to give every concurrent trial slot an equal
    share of the sweep's configurations, capped by ``members_that_fit()`` (how many members' text steps fit a trial's
    memory; asked only for ``auto``). Packs need one worker per trial.

    Raises:
        ValueError: a pack size above 1 for multi-worker (Ray Train) trials.
    """
    if requested != "auto":
        size = int(requested)
        if size > 1 and runner != "in-process":
            raise ValueError(f"--pack-size {size}: packs run in one process per trial; they cannot be combined with "
                             "--workers-per-trial above 1 or --trial-runner ray-train")
        return size
    if runner != "in-process":
        return 1
    return int(max(1, min(math.ceil(n_configs / max(max_concurrent, 1)), members_that_fit())))


def check_max_concurrent(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """How a sweep runs its trials: ``platform.tune``'s sweep flags, or the choices a study makes for itself.

    grid: ``FIELD=V1,V2`` items (:func:`parse_grid` types and checks them against the run's spec). num_samples:
    trials to sample, or with a grid how many times to run it (None: 16, with a grid 1). max_concurrent: trials at
    once (None: as many as fit the cluster). gpus_per_trial: the GPU share of a one-worker trial. trial_runner: one
    of :data:`TRIAL_RUNNERS`. fixed: searched fields held at their flag value. search_seed: TPE's seed (None: the
    run's seed). grace_period, reduction_factor: ASHA's. max_failures: recoveries per trial. name: the sweep folder's
    name (None: made from the kind, dataset and time). resume: finish the interrupted sweep ``name``. pack_size:
    configurations per trial, trained together on one CLIP (``"auto"`` or a whole number; ``"1"``: a trial each).
    methods: the methods the sweep compares (``--method A B``: a searched or grid dimension ``method.name``); empty
    or one: the run's own method, not searched.
    """

    grid: tuple[str, ...] = ()
    num_samples: int | None = None
    max_concurrent: int | None = None
    gpus_per_trial: float = 1.0
    trial_runner: str = "auto"
    fixed: tuple[str, ...] = ()
    search_seed: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_failures: int = 2
    name: str | None = None
    resume: bool = False
    pack_size: str = "1"
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_pack_size(self.pack_size)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--method: give distinct methods of {', '.join(METHODS)}, got {' '.join(self.methods)}")
        check_trial_runner(self.trial_runner)
        check_gpu_share(self.gpus_per_trial)
        check_max_concurrent(self.max_concurrent)
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.grace_period < 1:
            raise ValueError(f"--grace-period must be >= 1 (epochs every trial runs before ASHA may stop it), got "
                             f"{self.grace_period}")
        if not self.reduction_factor > 1:
            raise ValueError(f"--reduction-factor must be > 1 (ASHA keeps the top 1/factor of trials at each rung), "
                             f"got {self.reduction_factor}")

    def resolved_num_samples(self, grid: Mapping[str, Sequence[Any]]) -> int:
        """Trials to sample (or times to run ``grid``): the setting, else 1 for a grid sweep and 16 for a search."""
        if self.num_samples is not None:
            return self.num_samples
        return 1 if grid else 16


@dataclasses.dataclass(frozen=True)
class InfraSettings:
    """Where a sweep runs and is tracked: the cluster, storage and MLflow flags (``platform.cli``), and the console.

    use_gpu: ``auto``, ``yes`` or ``no`` (resolved against the cluster once Ray is up).
    """

    storage_path: str
    tracking_uri: str | None = None
    experiment: str | None = None
    ray_address: str | None = None
    use_gpu: str = "auto"
    verbose: bool = False
    json: bool = False

    def __post_init__(self) -> None:
        if self.use_gpu not in USE_GPU_VALUES:
            raise ValueError(f"--use-gpu must be one of {', '.join(USE_GPU_VALUES)}, got {self.use_gpu!r}")

    @property
    def resolved_storage_path(self) -> str:
        """The storage path, made absolute unless it is a URI (``s3://...``)."""
        return self.storage_path if "://" in self.storage_path else str(Path(self.storage_path).resolve())


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What kind of sweep :func:`run_sweep` runs: ``platform.tune``'s own, or a study's (``platform/study.py``).

    kind: the sweep folder's and parent run's name prefix (``sweep``, ``study``). entry_point: the CLI, tagged on
    the parent run. search: sample the dataset's search space (False: only ``--grid`` and the flags' values).
    early_stopping: ASHA on validation accuracy (False: every trial runs all its epochs). register: register the best
    trial by validation accuracy. describe: ``describe(spec, state) -> str``, the parent run's description (default:
    the sweep's). finish: ``finish(summary, rows, state) -> dict``, called once the trials have ended and before the
    parent run is closed, to log the plan's own results to it; what it returns joins the summary. report:
    ``report(summary) -> str``, printed after the sweep's report. json_keys: summary keys ``--json`` prints too.
    eval_targets: ``RunSpec.eval_targets`` of every trial (``platform.run_spec.DatasetRef``), tested after training.
    resume_flags: the entry point's own flags its ``--resume`` command needs (a study's ``--protocol``, ``--targets``).
    """

    kind: str = "sweep"
    entry_point: str = "platform.tune"
    search: bool = True
    early_stopping: bool = True
    register: bool = True
    describe: Any = None
    finish: Any = None
    report: Any = None
    json_keys: tuple[str, ...] = ()
    eval_targets: tuple[Any, ...] = ()
    resume_flags: tuple[str, ...] = ()


def parse_grid(items: Sequence[str], spec: Any) -> dict[str, list[Any]]:
    """``["prompt.n_ctx=4,8", "prompt.csc=true,false"]`` -> ``{"prompt.n_ctx": [4, 8], "prompt.csc": [True, False]}``.

    Values take the type of the field in ``spec`` (int, float, bool as true/false, or text; ``train.epochs`` is an
    int) and each one is validated by the configs.

    Raises:
        ValueError: a malformed item, an unknown field, a repeated field, or a value the configs reject.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        section, _, name = field.partition(".")
        if not sep or section not in ("prompt", "train", "method") or not name or not raw:
            raise ValueError(f"--grid {item!r}: expected FIELD=V1,V2,... with FIELD prompt.<name>, train.<name> or "
                             "method.<name>")
        config = getattr(spec, section)
        if not hasattr(config, name):
            raise ValueError(f"--grid {item!r}: {section} has no field {name!r}")
        if field in grid:
            raise ValueError(f"--grid {field} is given twice")
        current = getattr(config, name)
        kind = int if current is None else type(current)
        values = []
        for text in raw.split(","):
            text = text.strip()
            try:
                if kind is bool:
                    if text.lower() not in ("true", "false"):
                        raise ValueError(text)
                    value: Any = text.lower() == "true"
                else:
                    value = kind(text)
            except ValueError:
                raise ValueError(f"--grid {field}: {text!r} is not a valid {kind.__name__}") from None
            spec.with_overrides({field: value})  # the configs validate it
            values.append(value)
        if len(set(values)) != len(values):
            raise ValueError(f"--grid {field}: repeated values in {raw!r}")
        grid[field] = values
    for point in itertools.product(*grid.values()):  # fields that only fail together (cocoop with csc)
        try:
            spec.with_overrides(dict(zip(grid, point)))
        except ValueError as err:
            raise ValueError(f"--grid: {', '.join(f'{k}={v}' for k, v in zip(grid, point))} cannot run: {err}"
                             ) from None
    return grid


def field_values(space: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None, field: str, default: Any
                 ) -> list[Any]:
    """Every value a trial of the sweep may give ``field``: the grid's, the space's choices, else ``default``."""
    from tune_spaces import Choice

    if grid and field in grid:
        return list(grid[field])
    domain = space.get(field)
    return list(domain.values) if isinstance(domain, Choice) else [default]


def prompt_candidates(spec: Any, space: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None
                      ) -> list[tuple[int, str, bool]]:
    """Every ``(n_ctx, ctx_init, pad_ctx_init)`` a trial of the sweep may train (:func:`field_values`).

    The prompt's length depends on nothing else, so checking these before Ray starts proves every trial's prompt fits.
    """
    return [(n, init, pad) for n in field_values(space, grid, "prompt.n_ctx", spec.prompt.n_ctx)
            for init in field_values(space, grid, "prompt.ctx_init", spec.prompt.ctx_init)
            for pad in field_values(space, grid, "prompt.pad_ctx_init", spec.prompt.pad_ctx_init)]


def check_pack_methods(pack_size: str, spec: Any, space: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None
                       ) -> None:
    """Refuse packing a sweep whose trials may train another method than CoOp (the flag's, the searched or the grid's
    ``method.name``): a pack shares one plain-context text step, which has no other method's loss or prompts.

    Raises:
        ValueError: the methods, and ``--pack-size 1`` as the fix.
    """
    methods = field_values(space, grid, "method.name", spec.method.name)
    if pack_size != "1" and any(m != "coop" for m in methods):
        raise ValueError(f"--pack-size {pack_size}: packs train CoOp configurations only (one text step shared by "
                         f"plain contexts); use --pack-size 1 to train {', '.join(methods)}")


def shot_candidates(spec: Any, grid: Mapping[str, Sequence[Any]] | None) -> list[int | str]:
    """Every shot count a trial of the sweep may train: the grid's (a study's ``--shots``), else the spec's.

    The base spec's own count is not among them when the grid sets it: no trial trains it, so it is not checked.
    """
    return list(grid["train.shots"]) if grid and "train.shots" in grid else [spec.train.shots]


def resolve_trial_runner(requested: str, spec: Any) -> str:
    """``in-process`` for single-worker trials and ``ray-train`` for DDP trials, unless ``requested`` says otherwise.

    Raises:
        ValueError: an unknown runner, or ``in-process`` for a trial of several workers.
    """
    check_trial_runner(requested)
    if requested == "auto":
        return "in-process" if spec.num_workers == 1 else "ray-train"
    if requested == "in-process" and spec.num_workers > 1:
        raise ValueError(f"--trial-runner in-process runs one worker per trial; --workers-per-trial "
                         f"{spec.num_workers} needs ray-train (or auto)")
    return requested


def validate_gpus_per_trial(value: float, spec: Any, runner: str) -> float:
    """The GPU share of a trial: a fraction in (0, 1] for single-worker trials, 1 for DDP trials (ignored on CPUs).

    Several single-worker trials may share a GPU (0.25: four at once): one CoOp trial on cached features leaves a
    modern GPU mostly idle. DDP trials need a whole GPU per worker: NCCL refuses two ranks on one device.

    Raises:
        ValueError: outside (0, 1], or a fraction for a multi-worker trial.
    """
    if not spec.use_gpu:
        return 0.0
    check_gpu_share(value)
    if runner == "ray-train" and value != 1:
        raise ValueError(f"--gpus-per-trial {value}: trials of several DDP workers take one whole GPU per worker "
                         "(NCCL cannot place two ranks on one GPU); use 1, or one worker per trial")
    return float(value)


def resolve_max_concurrent(requested: int | None, spec: Any, cluster: Mapping[str, float],
                           gpus_per_trial: float = 1.0) -> int:
    """Concurrent trials that fit the cluster at once: ``requested`` capped by CPUs (and GPUs) per trial.

    Raises:
        ValueError: not even one trial fits the cluster.
    """
    per_trial_cpus = spec.num_workers * spec.cpus_per_worker
    fits = math.floor(cluster.get("CPU", 0) / per_trial_cpus + 1e-9)
    per_trial_gpus = spec.num_workers * gpus_per_trial if spec.use_gpu else 0.0
    if spec.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / per_trial_gpus + 1e-9))
    if fits < 1:
        raise ValueError(
            f"one trial needs {spec.num_workers} worker(s) x {spec.cpus_per_worker} CPU"
            f"{f' + {per_trial_gpus:g} GPU in all' if spec.use_gpu else ''}, more than the Ray cluster has "
            f"({dict(cluster)}); lower --workers-per-trial / --cpus-per-worker / --gpus-per-trial"
        )
    if requested is None:
        return fits
    check_max_concurrent(requested)
    if requested > fits:
        logger.warning("--max-concurrent %d lowered to %d: only %d trial(s) of %d worker(s) fit the cluster at once",
                       requested, fits, fits, spec.num_workers)
    return min(requested, fits)


def grid_epochs(spec: Any, grid: Mapping[str, Sequence[Any]] | None) -> int:
    """The most epochs any trial of the sweep trains (a grid over ``train.shots`` follows CoOp's epochs by shots)."""
    if not grid or "train.shots" not in grid:
        return spec.train.resolved_epochs
    return max(spec.with_overrides({"train.shots": k}).train.resolved_epochs for k in grid["train.shots"])
