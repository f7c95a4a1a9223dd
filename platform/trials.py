"""A sweep's trials: the Ray Tune function trainables ``platform.tune`` runs, one per path.

- :func:`in_process_trial` (trials with one worker, the default): the trial *is* the training process.
  ``platform.worker.run_training`` runs inside the Tune trial's own actor with ``RaySession("tune")`` —
  ``ray.tune.report`` per epoch with the checkpoint, ``ray.tune.get_checkpoint`` on a retry or ``--resume`` — and no
  Ray Train controller, worker group, process group or placement-group cleaner is started. The trial reserves the
  worker's CPUs (and its GPU share); Tune reuses the actor for the next trial, and the process's warm cache
  (``platform/process_cache.py``) keeps CLIP and the features loaded between trials.
- :func:`packed_trial` (``--pack-size K > 1``): like an in-process trial, but the trial trains up to K of the sweep's
  configurations together on one CLIP (``platform.pack_worker.run_pack``, ``platform/sweep/packs.py``), each with
  its own report, checkpoint, MLflow run and ASHA decision (``platform/sweep/halving.py``).
- :func:`ray_train_trial` (``--workers-per-trial N > 1``): the trial drives one Ray Train run of N DDP workers, as
  ``platform.train`` does, named by the trial id so that a retried or resumed trial continues from its last
  checkpoint. Its epoch reports reach Tune through ``TrialReportCallback``, and ``GracefulASHA`` stops it through
  ``platform/trial_stopping.py`` so its workers are released cleanly.

Why two paths: a CoOp trial is seconds of compute on cached features, while a Ray Train run costs a controller actor,
a worker group, a placement group and a process-group rendezvous before the first step — tens of seconds per trial
on a small machine. DDP only pays off when one trial needs several devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from platform.pack_worker import run_pack
from platform.progress import board_reporter
from platform.run_spec import RunSpec
from platform.sweep import packs
from platform.sweep.halving import RungsClient
from platform.trainer import build_trainer
from platform.trial_stopping import TrialControllerCallback, TrialReportCallback, was_stopped_by_scheduler
from platform.worker import EpochHook, RaySession, configure_worker_logging, run_training
from typing import Any

import ray
import ray.tune
import torch


def searched_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config-field entries (``prompt.*``, ``train.*``, ``method.*``) of a Tune trial config."""
    return {k: v for k, v in config.items() if k.partition(".")[0] in ("prompt", "train", "method") and "." in k}


def trial_spec(base_spec: Mapping[str, Any], config: Mapping[str, Any]) -> RunSpec:
    """The :class:`RunSpec` a trial trains: the sweep's spec with the trial's searched values."""
    return RunSpec.from_dict(base_spec).with_overrides(searched_overrides(config))


def in_process_trial(config: dict[str, Any], *, base_spec: dict[str, Any], log_level: str = "WARNING",
                     epoch_hooks: Sequence[EpochHook] = (), progress_board: Any = None) -> None:
    """Tune function trainable: one single-worker CoOp run in this trial's process (see the module docstring).

    ``progress_board``: the driver's ``platform.progress.ProgressBoard`` for the feature-extraction bar (the
    driver's trial bar counts the epochs), or None.
    """

    spec = trial_spec(base_spec, config)
    configure_worker_logging(0, log_level, progress_lines=False)  # the driver logs the trial's progress
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # the CPUs this trial reserved
    run_training(spec, RaySession("tune"), device=_device(spec), epoch_hooks=epoch_hooks, log_epochs=False,
                 progress=_features_progress(progress_board))


def _device(spec: RunSpec) -> torch.device:
    return torch.device("cuda", 0) if spec.use_gpu and ray.get_gpu_ids() else torch.device("cpu")


def _features_progress(progress_board: Any) -> Any:
    """A trial's progress callback for the driver's bars: the feature extraction only (the driver's trial bar counts
    the epochs)."""
    report = board_reporter(progress_board)

    def features_only(task: str, done: int, total: int) -> None:
        if task == "features":
            report(task, done, total)

    return features_only


def packed_trial(config: dict[str, Any], *, base_spec: dict[str, Any], log_level: str = "WARNING",
                 rungs_actor: str | None = None, progress_board: Any = None,
                 epoch_hooks: Sequence[EpochHook] = ()) -> None:
    """Tune function trainable: a pack of configurations (``config["pack"]``) trained together in this trial's
    process (see the module docstring). ``rungs_actor``: the name of the sweep's ``RungsActor`` (ASHA's records for
    every configuration), or None when the sweep does not stop early (a study). ``epoch_hooks``: called after each
    pack epoch's report with ``(epoch, 0)``."""

    trial_id = ray.tune.get_context().get_trial_id()
    members = packs.members(trial_id, config)
    specs = [trial_spec(base_spec, cfg) for _, cfg in members]
    configure_worker_logging(0, log_level, progress_lines=False)
    torch.set_num_threads(max(1, int(specs[0].cpus_per_worker)))
    stop = None
    if rungs_actor is not None:
        actor = ray.get_actor(rungs_actor)
        stop = RungsClient(lambda mid, epoch, value: ray.get(actor.stop.remote(mid, epoch, value)),
                           *ray.get(actor.plan.remote())).stop
    run_pack([mid for mid, _ in members], specs, RaySession("tune"), device=_device(specs[0]), stop=stop,
             progress=_features_progress(progress_board), epoch_hooks=epoch_hooks)


def ray_train_trial(config: dict[str, Any], *, base_spec: dict[str, Any], train_storage: str, max_failures: int,
                    log_level: str = "WARNING", epoch_hooks: Sequence[EpochHook] = ()) -> None:
    """Tune function trainable: one Ray Train run of ``spec.num_workers`` DDP workers (see the module docstring)."""

    spec = trial_spec(base_spec, config)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(spec, storage_path=train_storage, name=trial_id, max_failures=max_failures,
                            run_config_callbacks=[TrialReportCallback(), TrialControllerCallback(trial_id)],
                            log_level=log_level, epoch_hooks=epoch_hooks)
    try:
        trainer.fit()
    except Exception:
        if was_stopped_by_scheduler(trial_id):
            return  # ASHA stopped the trial: its Ray Train run was aborted on purpose
        raise
