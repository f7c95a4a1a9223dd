"""The Ray Train ``TorchTrainer`` of a run: DDP over ``spec.num_workers`` workers, each running
``platform.worker.train_loop_per_worker``. Used by ``platform.train`` and by multi-worker sweep trials."""

from __future__ import annotations

from collections.abc import Sequence
from platform.artifacts import CHECKPOINTS_KEPT
from platform.run_spec import RunSpec
from platform.worker import EpochHook, train_loop_per_worker
from typing import Any


def build_trainer(
    spec: RunSpec,
    *,
    storage_path: str,
    name: str,
    run_config_callbacks: Sequence[Any] | None = None,
    max_failures: int = 2,
    epoch_hooks: Sequence[EpochHook] = (),
    log_level: str = "WARNING",
    progress_board: Any = None,
) -> Any:
    """A Ray Train ``TorchTrainer`` for ``spec`` (DDP over ``spec.num_workers`` workers).

    Args:
        spec: the run.
        storage_path: where Ray Train persists checkpoints (a shared path or ``s3://`` URI on multi-node clusters).
        name: the run's folder name under ``storage_path``.
        run_config_callbacks: Ray Train ``UserCallback``s, e.g. ``ray.tune.integration.ray_train.TuneReportCallback()``
            to forward each epoch's report to Ray Tune.
        max_failures: worker failures to recover from (restarting from the last checkpoint).
        epoch_hooks: called in every worker after each epoch's report with ``(epoch, rank)`` (picklable callables;
            tests inject worker faults through them).
        log_level: Ray Train's and the workers' console log level (rank 0's progress lines are always shown).
        progress_board: the driver's ``platform.progress.ProgressBoard`` (rank 0 reports features and epochs to
            it), or None when the driver draws no bars.

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
        train_loop_config={"spec": spec.to_dict(), "log_level": log_level, "epoch_hooks": list(epoch_hooks),
                           "progress_board": progress_board},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources, placement_strategy=spec.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            callbacks=list(run_config_callbacks) if run_config_callbacks else None,
            logging_config=LoggingConfig(log_level=log_level),
        ),
    )

