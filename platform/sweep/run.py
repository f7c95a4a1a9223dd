"""``run_sweep``: a sweep from the checks before Ray starts to its outcome, in the order it goes, printing nothing.

1. :func:`resolve_target`: what runs -- the sweep's name and folder, its trials' base run, search space or grid, and
   trial runner; from the saved state when resuming.
2. ``platform.launch.check_before_ray``: every input checked (every shot count and prompt a trial may train).
3. Ray's start-up, the tracking store opened meanwhile (``platform.launch.start_ray``), then :func:`place`: the GPU
   share and how many trials fit at once.
4. :func:`start_or_continue`: the sweep's MLflow parent run opened (and its state file written), or the resumed
   one set running again.
5. :func:`fit`: the Tuner runs every trial, each logged to its MLflow child run as it goes.
6. :func:`conclude`: the trials' outcome -- runs the callback missed closed, the best trial registered, the parent
   run closed, the dashboards drawn -- or, after Ctrl-C, the runs marked KILLED.

The CLIs (which set up logging) print the :class:`~platform.sweep.outcome.SweepOutcome`
(``platform.sweep.flags.present``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform.launch import INPUT_ERRORS, Checked, check_before_ray, resolve_gpus, start_ray, warn_unshared_paths
from platform.progress import ConsoleProgress, TrialBar, bars_wanted
from platform.run_spec import RunSpec
from platform.sweep.halving import RUNGS_ACTOR_PREFIX, RungsActor
from platform.sweep.interrupt import SweepInterrupt, interrupted
from platform.sweep.outcome import SweepOutcome, best_trial_summary, pick_best, register_best, summarise, trial_rows
from platform.sweep.packs import text_step_cost
from platform.sweep.parent_run import close_sweep, close_unclosed_runs, draw_dashboards, open_sweep
from platform.sweep.plan import (
    METRIC,
    InfraSettings,
    SweepPlan,
    SweepSettings,
    check_pack_methods,
    grid_epochs,
    parse_grid,
    prompt_candidates,
    resolve_max_concurrent,
    resolve_pack_size,
    resolve_trial_runner,
    shot_candidates,
    validate_gpus_per_trial,
)
from platform.sweep.state import (
    SWEEP_STATE_FILE,
    SweepState,
    latest_sweep,
    n_configurations,
    read_sweep_state,
    resume_command,
    sweep_folder,
)
from platform.sweep.timing import timing
from platform.sweep.trial_runs import error_line
from platform.sweep.tuner import build_tuner
from platform.sweep_tracking import MlflowSweepCallback
from platform.tracking import resolve_tracking_uri
from platform.tracking_store import limit_http_retries
from platform.trial_stopping import CONTROLLERS_ACTOR_NAME, TrialControllersActor
from platform.trials import trial_spec
from typing import Any

import ray
import torch
from mlflow.tracking import MlflowClient

from coop_core.backbone import text_dims
from coop_core.datasets import DatasetSplits, get_dataset_spec
from coop_core.distributed import text_activation_bytes
from tune_spaces import space_for, with_methods

logger = logging.getLogger(__name__)


BAR_LABELS = {"features": "image features"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What a sweep runs, resolved from the flags (a new sweep) or from its state file (``saved``: a resumed one).

    name, sweep_dir: the sweep's folder under the storage path. spec: every trial's base run. space: the searched
    fields' domains (empty for a grid or a study). grid: ``{field: values}`` (empty for a search). runner: the trial
    runner. tracking_uri: the MLflow store.
    """

    name: str
    sweep_dir: str
    spec: RunSpec
    space: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]]
    runner: str
    tracking_uri: str
    saved: SweepState | None = None


def resolve_target(spec: RunSpec, settings: SweepSettings, infra: InfraSettings, plan: SweepPlan) -> Target:
    """The sweep :func:`run_sweep` runs.

    Raises:
        ValueError: nothing to resume, a ``--fixed`` field that is not searched, a bad grid (one line each).
    """
    storage_path = infra.resolved_storage_path
    ref = spec.data_ref
    name, saved = settings.name, None
    if settings.resume:
        name = name or latest_sweep(storage_path, ref.name, plan.kind)
        if name is None:
            raise ValueError(f"--resume: no sweep of {ref.name!r} under {storage_path} (pass --sweep-name)")
        saved = read_sweep_state(sweep_folder(storage_path, name))
        if saved is None:
            raise ValueError(f"--resume: {sweep_folder(storage_path, name)}/{SWEEP_STATE_FILE} not found; "
                             "is this a sweep folder?")
    name = name or f"{plan.kind}-{ref.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    template = ref.source.template if ref.source is not None else get_dataset_spec(ref.name).template
    space = with_methods(space_for(ref.name, template), settings.methods) if plan.search else {}
    unknown = sorted(set(settings.fixed) - set(space))
    if unknown:
        raise ValueError(f"--fixed {' '.join(unknown)}: not searched for {ref.name}; "
                         f"searched fields: {', '.join(space)}")
    space = {k: v for k, v in space.items() if k not in settings.fixed}
    if saved is not None:
        return Target(name, sweep_folder(storage_path, name), saved.spec, space, saved.grid, saved.trial_runner,
                      saved.tracking_uri, saved)
    spec = dataclasses.replace(spec, eval_targets=plan.eval_targets)
    grid_items = settings.grid
    if settings.grid and len(settings.methods) > 1:  # a grid sweep compares the methods as one more grid field
        if any(item.startswith("method.name=") for item in settings.grid):
            raise ValueError("--method A B and --grid method.name=...: give the methods once")
        grid_items = (*settings.grid, f"method.name={','.join(settings.methods)}")
    grid = parse_grid(grid_items, spec)
    check_pack_methods(settings.pack_size, spec, {} if grid else space, grid)
    return Target(name, sweep_folder(storage_path, name), spec, {} if grid else space, grid,
                  resolve_trial_runner(settings.trial_runner, spec), resolve_tracking_uri(infra.tracking_uri))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the trials run once Ray is up: the base run with ``use_gpu`` resolved, each trial's GPU share, and how
    many trials run at once."""

    spec: RunSpec
    gpus_per_trial: float
    max_concurrent: int
    pack_size: int = 1


# The memory a packed trial's text steps may take, as a share of the node's free memory per concurrent trial (CPU) or
# of the trial's GPU share of a GPU (GPU); the rest is CLIP, the features and the framework.
PACK_MEMORY_SHARE = 0.5


ASSUMED_GPU_BYTES = 16 * 1024**3  # a GPU's memory when the driver has none to ask (a CPU head node)


def available_memory_bytes() -> int:
    """This node's available memory (``MemAvailable`` of ``/proc/meminfo``; total pages elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gpu_memory_bytes() -> int:
    """The memory of this node's first GPU, or :data:`ASSUMED_GPU_BYTES` when the driver has no GPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return ASSUMED_GPU_BYTES


def pack_size_for(requested: str, target: Target, settings: SweepSettings, spec: RunSpec, n_classes: int,
                  max_concurrent: int, gpus_per_trial: float) -> int:
    """The sweep's configurations per trial (``platform.sweep.plan.resolve_pack_size``); for ``auto``, the text step's
    memory estimated at the full prompt length for one member (``coop_core.distributed.text_activation_bytes``)."""

    def members_that_fit() -> int:
        width, layers, seq = text_dims(spec.model.backbone)
        member = text_activation_bytes(n_classes, seq, 0, width, layers)
        if spec.use_gpu:
            budget = int(PACK_MEMORY_SHARE * gpus_per_trial * gpu_memory_bytes())
        else:
            budget = int(PACK_MEMORY_SHARE * available_memory_bytes() / max(max_concurrent, 1))
        return max(1, budget // max(member, 1))

    n_configs = n_configurations(settings.resolved_num_samples(target.grid), target.grid)
    return resolve_pack_size(requested, n_configs=n_configs, max_concurrent=max_concurrent, runner=target.runner,
                             members_that_fit=members_that_fit)


def place(target: Target, settings: SweepSettings, infra: InfraSettings, checked: Checked) -> Placement:
    """Fit the trials to the cluster Ray joined (a resumed sweep keeps its GPU share).

    Raises:
        ValueError: not one trial fits, or a GPU share that DDP trials cannot take.
    """
    if target.saved is None:
        spec = resolve_gpus(target.spec, infra.use_gpu)
        gpus_per_trial = validate_gpus_per_trial(settings.gpus_per_trial, spec, target.runner)
    else:
        spec, gpus_per_trial = target.spec, target.saved.gpus_per_trial
    max_concurrent = resolve_max_concurrent(settings.max_concurrent, spec, ray.cluster_resources(), gpus_per_trial)
    warn_unshared_paths(checked.splits, spec, infra.resolved_storage_path)
    if target.saved is not None:
        pack_size = target.saved.pack_size
    else:
        pack_size = pack_size_for(settings.pack_size, target, settings, spec, len(checked.splits.classnames),
                                  max_concurrent, gpus_per_trial)
    return Placement(spec, gpus_per_trial, max_concurrent, pack_size)


def start_or_continue(target: Target, settings: SweepSettings, infra: InfraSettings, plan: SweepPlan,
                      placement: Placement) -> SweepState:
    """Open the sweep's MLflow parent run and write its state file; a resumed sweep's run is set RUNNING again.

    Raises:
        Exception: whatever the tracking store raises (it passed the probe a moment ago; nothing has run yet).
    """
    if target.saved is not None:
        MlflowClient(target.saved.tracking_uri).update_run(target.saved.parent_run_id, status="RUNNING")
        return target.saved
    return open_sweep(settings, infra, placement.spec, target.space, target.grid, target.name, target.sweep_dir,
                      placement.max_concurrent, target.runner, placement.gpus_per_trial, plan,
                      pack_size=placement.pack_size)


def fit(target: Target, settings: SweepSettings, infra: InfraSettings, state: SweepState, placement: Placement,
        callback: MlflowSweepCallback, splits: DatasetSplits) -> tuple[list[dict[str, Any]], bool]:
    """Run the Tuner (restored when resuming) with the MLflow callback and the console's bars; the trials' rows and
    whether Ctrl-C stopped it. A packed grid is cut into packs of even estimated work (``packs.text_step_cost`` on
    ``splits``' classes)."""
    spec, epochs = placement.spec, grid_epochs(placement.spec, state.grid)
    base, n_classes, n_train_all = spec.to_dict(), len(splits.classnames), len(splits.train)

    def pack_cost(config: Mapping[str, Any]) -> float:
        return text_step_cost(trial_spec(base, config), n_classes, n_train_all)

    bars = ConsoleProgress(bars_wanted(json_output=infra.json, verbose=infra.verbose), labels=BAR_LABELS)
    with bars:
        trial_bar = TrialBar(bars, state.n_trials, epochs, METRIC)
        rungs = None
        if state.pack_size > 1 and state.early_stopping:  # ASHA's records for every configuration of the sweep
            rungs = ray.remote(RungsActor).options(name=RUNGS_ACTOR_PREFIX + target.name, num_cpus=0,
                                                   get_if_exists=True).remote(
                epochs, min(settings.grace_period, epochs), settings.reduction_factor, target.sweep_dir)
        tuner = build_tuner(settings, infra.verbose, spec, target.space, state, target.name,
                            infra.resolved_storage_path, target.sweep_dir, placement.max_concurrent,
                            [callback, trial_bar], restore=settings.resume, progress_board=bars.board,
                            rungs_actor=RUNGS_ACTOR_PREFIX + target.name if rungs is not None else None,
                            pack_cost=pack_cost)
        controllers = None
        if state.trial_runner == "ray-train":
            controllers = TrialControllersActor.options(name=CONTROLLERS_ACTOR_NAME, get_if_exists=True).remote()
        with SweepInterrupt(callback) as interrupt:
            results = tuner.fit()
    if controllers is not None:
        logger.info("trial controllers: %s", ray.get(controllers.stats.remote()))
        ray.kill(controllers)  # the sweep is over: nothing is left to stop or reap
    if rungs is not None:
        ray.kill(rungs)
    return trial_rows(results, epochs), interrupt.requested


def conclude(rows: Sequence[Mapping[str, Any]], summary: dict[str, Any], state: SweepState, plan: SweepPlan,
             callback: MlflowSweepCallback, target: Target, storage_path: str, t0: float) -> int:
    """Log what the trials came to and register the best (``summary`` gains the outcome); the exit status.

    Everything here writes to MLflow. If the server went away, the trials' results stay in their checkpoints and the
    summary holds the command that logs them (and registers the best trial, once) when it is back.
    """
    best = pick_best(rows)
    tracking_error = None
    try:
        callback.setup()
        close_unclosed_runs(callback, rows)
        if best is not None and state.register:
            summary.update(register_best(best, callback, state, target.name, storage_path))
        elif best is not None:
            summary.update(best_trial_summary(best, callback))
    except Exception as err:  # whatever the store raises; the sweep's results are safe on disk
        tracking_error = error_line(err)
    summary["wall_s"] = time.perf_counter() - t0
    summary["timing"] = timing(callback.timings, len(rows), summary["wall_s"], callback.windows)
    if tracking_error is None:
        try:
            if plan.finish is not None:
                summary.update(plan.finish(summary, rows, state))
            close_sweep(summary, state)
            summary["dashboards"] = draw_dashboards(state, target.sweep_dir)
        except Exception as err:
            tracking_error = error_line(err)
    summary.update(tracking_complete=tracking_error is None, tracking_error=tracking_error,
                   log_command=None if tracking_error is None else callback.log_command())
    return 0 if best is not None and tracking_error is None else 1


def run_sweep(spec: RunSpec, settings: SweepSettings, infra: InfraSettings, plan: SweepPlan = SweepPlan()
              ) -> SweepOutcome:
    """Run the sweep of ``spec`` (every trial's base run) that ``settings``, ``infra`` and ``plan`` describe.

    With ``settings.resume`` the sweep's saved state replaces ``spec`` and the settings it was started with. Prints
    nothing (log records aside); the outcome's status is 0 ok, 1 no trial finished or MLflow failed, 2 bad input,
    130 interrupted.
    """
    limit_http_retries()
    t0 = time.perf_counter()
    storage_path = infra.resolved_storage_path
    try:
        target = resolve_target(spec, settings, infra, plan)
        checked = check_before_ray(target.spec, tracking_uri=target.tracking_uri, storage_path=storage_path,
                                   prompts=prompt_candidates(target.spec, target.space, target.grid),
                                   shots=shot_candidates(target.spec, target.grid))
        started_ray = start_ray(infra.ray_address, verbose=infra.verbose, offline=checked.offline,
                                tracking_uri=target.tracking_uri)
    except INPUT_ERRORS as err:
        return SweepOutcome(status=2, error=str(err))
    stopping: threading.Thread | None = None  # Ray's shutdown, once the trials are over
    try:  # Ray stops before the outcome is printed: no worker log can follow the report and the JSON line
        try:
            placement = place(target, settings, infra, checked)
        except ValueError as err:
            return SweepOutcome(status=2, error=str(err))
        try:
            state = start_or_continue(target, settings, infra, plan, placement)
        except Exception as err:
            return SweepOutcome(status=2, error=f"MLflow tracking failed before the sweep started ({error_line(err)}); "
                                "nothing was trained, run the command again once the tracking store works")
        logger.info("%s %s: %d trials of %s, %d at once (%s trials); MLflow run %s (%s)", plan.kind, target.name,
                    state.n_trials, placement.spec.data_ref.label, placement.max_concurrent, state.trial_runner,
                    state.parent_run_id, state.tracking_uri)
        callback = MlflowSweepCallback(parent_run_id=state.parent_run_id, experiment=state.experiment,
                                       tracking_uri=state.tracking_uri, base_spec=placement.spec.to_dict(),
                                       storage_path=storage_path, epochs=grid_epochs(placement.spec, state.grid),
                                       sweep_name=target.name,
                                       resume_command=resume_command(state, target.name, storage_path))
        rows, stopped = fit(target, settings, infra, state, placement, callback, checked.splits)
        summary = summarise(rows, placement.spec, state, target.name, target.sweep_dir, settings.resume)
        summary["resume_command"] = callback.resume_command
        if stopped:  # Ctrl-C: Tune stopped the trials and saved its state, fit() returned early
            return SweepOutcome(status=130, summary=summary, rows=tuple(rows), notice=interrupted(callback, summary))
        if started_ray:  # what is left reads MLflow and the trials' folders, not Ray: it stops meanwhile
            stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
            stopping.start()
        status = conclude(rows, summary, state, plan, callback, target, storage_path, t0)
        return SweepOutcome(status=status, summary=summary, rows=tuple(rows))
    finally:
        if stopping is not None:
            stopping.join()
        elif started_ray:
            ray.shutdown()
