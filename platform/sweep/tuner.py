"""The Ray Tune ``Tuner`` of a sweep: its trainable and resources, search space, scheduler and Tune's environment
knobs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from platform.artifacts import CHECKPOINTS_KEPT
from platform.sweep.pack_search import PackedOptunaSearch
from platform.sweep.packs import PACK_KEY, chunk, grid_configs, pack_sizes
from platform.sweep.plan import METRIC, MODE, SweepSettings, grid_epochs
from platform.sweep.state import SweepState
from platform.trial_stopping import GracefulASHA
from platform.trials import in_process_trial, packed_trial, ray_train_trial
from typing import Any

import optuna
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from tune_spaces import Choice, LogUniform

logger = logging.getLogger(__name__)


TRAIN_RUNS_DIR = "train_runs"  # in the sweep folder: one Ray Train run per multi-worker trial, named by trial id
TRIAL_MEMORY_BYTES = 256 * 1024**2  # a multi-worker trial's own reservation: it waits on its trainer, no CPU needed


def to_tune_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Tune domains for a ``tune_spaces`` space: ``Choice`` -> ``tune.choice``, ``LogUniform`` -> ``loguniform``."""

    out: dict[str, Any] = {}
    for key, domain in space.items():
        if isinstance(domain, Choice):
            out[key] = tune.choice(list(domain.values))
        elif isinstance(domain, LogUniform):
            out[key] = tune.loguniform(domain.low, domain.high)
        else:
            raise ValueError(f"search-space value for {key!r} is not a tune_spaces domain: {domain!r}")
    return out


def build_tuner(settings: SweepSettings, verbose: bool, spec: Any, space: Mapping[str, Any], state: SweepState,
                name: str, storage_path: str, sweep_dir: str, max_concurrent: int, callbacks: Sequence[Any], *,
                restore: bool, epoch_hooks: Sequence[Any] = (), progress_board: Any = None,
                rungs_actor: str | None = None, pack_cost: Callable[[Mapping[str, Any]], float] | None = None) -> Any:
    """The Tuner: restored from ``sweep_dir`` (searcher, scheduler, trial states) or new (Optuna TPE + ASHA).

    Single-worker trials (``in-process``) reserve their worker's CPUs and GPU share, reuse their actor for the next
    trial, and are retried from their last checkpoint by Tune (``max_failures``). Multi-worker trials (``ray-train``)
    reserve only a little memory — their Ray Train workers hold the CPUs — and recover lost workers inside Ray Train.
    ``epoch_hooks`` reach every trial's training function (see ``platform.worker.run_training``);
    ``progress_board`` (``platform.progress``) receives the trials' feature-extraction progress for the driver's bars.

    Packed sweeps (``state.pack_size > 1``, ``platform/sweep/packs.py``): each trial trains a pack of configurations
    (``packed_trial``), asked from Optuna together (``PackedOptunaSearch``) or cut from the grid (into packs of even
    ``pack_cost``, a grid configuration's estimated work, when given); Tune's scheduler is FIFO and ASHA's rule is
    applied to each configuration by the sweep's ``RungsActor`` (``rungs_actor``, its name).
    """

    log_level = "INFO" if verbose else "WARNING"
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory ..."
    max_failures = state.max_failures
    if state.pack_size > 1:
        trainable = tune.with_resources(tune.with_parameters(
            packed_trial, base_spec=spec.to_dict(), log_level=log_level, rungs_actor=rungs_actor,
            progress_board=progress_board, epoch_hooks=list(epoch_hooks)),
            {"cpu": spec.cpus_per_worker, "gpu": state.gpus_per_trial if spec.use_gpu else 0})
        trial_failures = max_failures
    elif state.trial_runner == "in-process":
        resources = {"cpu": spec.cpus_per_worker, "gpu": state.gpus_per_trial if spec.use_gpu else 0}
        trainable = tune.with_resources(tune.with_parameters(
            in_process_trial, base_spec=spec.to_dict(), log_level=log_level, epoch_hooks=list(epoch_hooks),
            progress_board=progress_board),
            resources)
        trial_failures = max_failures
    else:
        trainable = tune.with_resources(tune.with_parameters(
            ray_train_trial, base_spec=spec.to_dict(), train_storage=f"{sweep_dir}/{TRAIN_RUNS_DIR}",
            max_failures=max_failures, log_level=log_level, epoch_hooks=list(epoch_hooks)),
            {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
        trial_failures = 0  # Ray Train restarts lost workers from the run's checkpoint
    # Keeping CHECKPOINTS_KEPT (2) checkpoints per trial makes Tune snapshot its experiment state whenever a trial has
    # checkpointed twice (so --resume never points at a deleted checkpoint); with one checkpoint per CoOp epoch that is
    # often, and Tune warns about it each time. The snapshot is a small local write; the warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints its configuration box, the results folder and a TensorBoard hint even at
    # verbose=0; its legacy output (RAY_AIR_NEW_OUTPUT=0, a documented switch) is silent at verbose=0. The sweep's own
    # lines, bars and report say the same things. --verbose keeps Tune's output.
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A diverged trial ends with a report that has the reason (artifacts.FAILURE_KEY) and no val_acc; Tune's strict
    # metric check would turn that report into an error the trial is retried for (diverging again). Without the
    # check ASHA ignores the report and Optuna records the trial as pruned. Read by Tune at every result.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's default loggers are its JSON and CSV results (kept: Tune's ResultGrid reads them) and TensorBoard event
    # files, which nothing here reads (MLflow is the sweep's tracking) and which cost the driver more than the rest
    # of Tune's result handling for a packed trial's report of every member. Read by Tune when the run starts.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    callbacks = [*callbacks, JsonLoggerCallback(), CSVLoggerCallback()]
    if restore and tune.Tuner.can_restore(sweep_dir):
        logger.info("resuming sweep %s from %s", name, sweep_dir)
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    epochs = grid_epochs(spec, state.grid)
    asha = dict(time_attr="epoch", max_t=epochs, grace_period=min(settings.grace_period, epochs),
                reduction_factor=settings.reduction_factor)
    if not state.early_stopping or state.pack_size > 1:
        scheduler = FIFOScheduler()  # a study: every trial runs all its epochs; a pack: ASHA per member (halving.py)
    elif state.trial_runner == "ray-train":
        scheduler = GracefulASHA(**asha)
    else:
        scheduler = ASHAScheduler(**asha)
    num_samples = state.num_samples
    if state.pack_size > 1 and state.grid:  # every grid point, num_samples times, cut into packs
        configs = grid_configs(state.grid) * state.num_samples
        packs = chunk(configs, state.pack_size, None if pack_cost is None else [pack_cost(c) for c in configs])
        param_space, search_alg, num_samples = {PACK_KEY: tune.grid_search(packs)}, None, 1
    elif state.pack_size > 1:
        param_space = {}
        search_alg = PackedOptunaSearch(OptunaSearch.convert_search_space(to_tune_space(space)),
                                        pack_size=state.pack_size, num_configs=state.num_samples,
                                        seed=state.search_seed, metric=METRIC, mode=MODE)
        num_samples = len(pack_sizes(state.num_samples, state.pack_size))
    elif state.grid:
        param_space = {k: tune.grid_search(list(v)) for k, v in state.grid.items()}
        search_alg = None  # Tune's own variant generator walks the grid
    else:
        param_space = to_tune_space(space)
        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=state.search_seed))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            # Warm processes: the next trial runs in the previous trial's actor, whose warm cache holds CLIP and the
            # features. Safe for our function trainable: every trial builds its own context, optimiser and RNG state
            # (tests/platform/test_warm_trials.py), and ray_runtime raises Tune's wait for a stopped trial's thread so
            # a reuse never fails mid-epoch. Multi-worker trials hold no model in their actor, so nothing to reuse.
            reuse_actors=state.trial_runner == "in-process" or state.pack_size > 1,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=trial_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
    )
