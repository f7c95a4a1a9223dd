"""A sweep's callbacks: MLflow logging from the driver, and stopping trials without leaking their workers.

:class:`MlflowSweepCallback` (a Ray Tune callback): every trial becomes an MLflow child run of the sweep's parent run.
Tune calls callbacks in the driver process, so the SQLite store has exactly one writer. The callback keeps no state
that matters across a driver restart: it finds a trial's run by the ``coop.trial_id`` tag under the parent run, so a
resumed sweep continues the same runs (:meth:`MlflowSweepCallback.finish_from_result` closes the runs of trials that
finished while no driver was watching). It also prints one progress line per trial event. Per trial run: the full
resolved config as params (plus the effective context length), per-epoch metrics with ``step = epoch``
(``train_loss``, ``train_acc``, ``lr``, ``val_acc``...), the final epoch's test and zero-shot accuracy, and the final
checkpoint's artifacts (prompts as safetensors, config JSON, nearest-words table, history).

:class:`TrialReportCallback` forwards each epoch's report to Tune (``TuneReportCallback``) without the worker's
``done`` flag: Tune stops a trial the moment it sees ``done``, which would kill the trial's Ray Train controller
mid-shutdown; the trial ends when its trainer returns instead.

Stopping trials cleanly. When Tune stops a trial it kills the trial's actor, and with it the Ray Train controller the
actor owns, before the controller can remove its workers' placement group. Ray Train's own clean-up actor needs the
State API, i.e. the full dashboard (``ray[default]``), which a ``ray[tune,train]`` install lacks; without it every
stopped trial would hold its workers' CPUs until the driver exits, and the sweep would stall. So
:class:`GracefulASHA` first asks :class:`TrialControllersActor` (one named actor per sweep driver, where every trial's
:class:`TrialControllerCallback` registers its controller and placement group) to abort the trial's Ray Train run
the way Ctrl-C would, and only then lets Tune stop the trial. The registry also watches the controllers and removes
the placement group of any that die without shutting down.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

logger = logging.getLogger(__name__)

TRIAL_TAG = "coop.trial_id"
SWEEP_TAG = "coop.sweep"
EARLY_STOPPED_TAG = "coop.stopped_early"
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "lr", "val_acc", "val_macro_f1", "epoch_time_s")
FINAL_KEYS = ("test_acc", "test_macro_f1", "zeroshot_test_acc", "zeroshot_test_macro_f1", "setup_s", "train_loop_s",
              "worker_wall_s")
CHECKPOINT_PATH_KEY = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY
REGISTRY_NAME = "coop-trial-controllers"
REAPER_INTERVAL_S = 2.0


def searched_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config-field entries (``prompt.*``, ``train.*``) of a Tune trial config."""
    return {k: v for k, v in config.items() if k.partition(".")[0] in ("prompt", "train") and "." in k}


def describe_config(config: Mapping[str, Any]) -> str:
    """``n_ctx=8 ctx_init='a photo of a' position=end csc=False lr=0.0031`` for progress lines and tables."""
    parts = []
    for key, value in searched_overrides(config).items():
        name = key.split(".", 1)[1].replace("class_token_position", "position")
        if name == "ctx_init":
            value = repr(value) if value else "random"
        elif isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{name}={value}")
    return " ".join(parts)


@contextmanager
def checkpoint_dir(path: str, storage_path: str):
    """A local directory with the checkpoint at ``path`` (a path on ``storage_path``'s filesystem)."""
    from ray.train import Checkpoint

    if "://" in storage_path:
        import pyarrow.fs

        fs, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        checkpoint = Checkpoint(path=path, filesystem=fs)
    else:
        checkpoint = Checkpoint(path=path)
    with checkpoint.as_directory() as d:
        yield Path(d)


class MlflowSweepCallback(Callback):
    """Log each trial as an MLflow child run of ``parent_run_id`` (see the module docstring).

    Args:
        parent_run_id: the sweep's run.
        experiment: MLflow experiment of the child runs.
        tracking_uri: the tracking store (a SQLite URI by default).
        base_spec: ``RunSpec.to_dict()`` of the sweep; a trial's spec is this with the trial's searched values.
        storage_path: where the trials' Ray Train checkpoints live (to read their files).
        epochs: epochs per trial (for progress lines and the early-stopped tag).
        sweep_name: tagged on every child run.
    """

    def __init__(self, *, parent_run_id: str, experiment: str, tracking_uri: str, base_spec: Mapping[str, Any],
                 storage_path: str, epochs: int, sweep_name: str) -> None:
        self.parent_run_id = parent_run_id
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.base_spec = dict(base_spec)
        self.storage_path = storage_path
        self.epochs = epochs
        self.sweep_name = sweep_name
        self._runs: dict[str, str] = {}
        self._params_done: set[str] = set()
        self._started: dict[str, float] = {}

    # -- bookkeeping ------------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:  # pickled into the Tuner's state: no run caches
        state = self.__dict__.copy()
        state.update(_runs={}, _params_done=set(), _started={})
        return state

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def child_runs(self) -> dict[str, Any]:
        """The existing child runs of the parent, by trial id."""
        client = self._client()
        parent = client.get_run(self.parent_run_id)
        runs = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10_000,
        )
        return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}

    def trial_spec(self, config: Mapping[str, Any]):
        """The :class:`platform.train.RunSpec` a trial trains."""
        from platform.train import RunSpec

        return RunSpec.from_dict(self.base_spec).with_overrides(searched_overrides(config))

    def run_for(self, trial_id: str, config: Mapping[str, Any]) -> str:
        """The child run of ``trial_id``, created (with the trial's resolved config as params) if needed."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        from platform import tracking

        existing = self.child_runs().get(trial_id)
        if existing is not None:
            run_id = existing.info.run_id
            if "prompt.n_ctx_effective" in existing.data.params:
                self._params_done.add(trial_id)
        else:
            tags = {TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep_name, "coop.searched": describe_config(config)}
            run_id = tracking.create_run(self.experiment, run_name=f"trial-{trial_id}", tags=tags,
                                         parent_run_id=self.parent_run_id, tracking_uri=self.tracking_uri)
            params = tracking.flatten_params(self.trial_spec(config)) | {"trial_id": trial_id}
            tracking.log_params(run_id, params, tracking_uri=self.tracking_uri)
        self._runs[trial_id] = run_id
        return run_id

    def _log_effective_n_ctx(self, trial_id: str, run_id: str, checkpoint_path: str | None) -> None:
        """Log ``prompt.n_ctx_effective`` once, from the checkpoint's config (``ctx_init`` words decide it)."""
        if trial_id in self._params_done or not checkpoint_path:
            return
        try:
            with checkpoint_dir(checkpoint_path, self.storage_path) as d:
                resolved = json.loads((d / "config.json").read_text())
        except (OSError, ValueError) as err:
            logger.warning("trial %s: cannot read config.json from %s: %s", trial_id, checkpoint_path, err)
            return
        if "n_ctx_effective" in resolved:
            self._client().log_param(run_id, "prompt.n_ctx_effective", str(resolved["n_ctx_effective"]))
        self._params_done.add(trial_id)

    # -- Tune hooks ---------------------------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self._runs = {tid: run.info.run_id for tid, run in self.child_runs().items()}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_for(trial.trial_id, trial.config)
        if self._client().get_run(run_id).info.status != "RUNNING":  # a resumed trial
            self._client().update_run(run_id, status="RUNNING")
        self._started[trial.trial_id] = time.monotonic()
        logger.info("trial %s started: %s", trial.trial_id, describe_config(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result:
            return
        from platform import tracking

        run_id = self.run_for(trial.trial_id, trial.config)
        row = {k: result[k] for k in EPOCH_KEYS if k in result}
        tracking.log_epoch_metrics(run_id, [row], tracking_uri=self.tracking_uri)
        self._log_effective_n_ctx(trial.trial_id, run_id, result.get(CHECKPOINT_PATH_KEY))
        val = f" val_acc {result['val_acc']:.2f}" if "val_acc" in result else ""
        test = f" test_acc {result['test_acc']:.2f}" if "test_acc" in result else ""
        logger.info("trial %s epoch %d/%d: loss %.4f%s%s", trial.trial_id, int(result["epoch"]), self.epochs,
                    result.get("train_loss", math.nan), val, test)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finish_from_result(trial.trial_id, trial.config, trial.last_result or {})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from platform import tracking

        run_id = self.run_for(trial.trial_id, trial.config)
        tracking.end_run(run_id, "FAILED", tracking_uri=self.tracking_uri)
        logger.warning("trial %s failed (see its Ray logs); MLflow run %s marked FAILED", trial.trial_id, run_id)

    # -- closing a trial's run ----------------------------------------------------------------------------------------

    def finish_from_result(self, trial_id: str, config: Mapping[str, Any], last_result: Mapping[str, Any]) -> str:
        """Close a trial's run from its last result: missing epochs, final metrics, artifacts, status FINISHED.

        Idempotent: epochs already in MLflow are not logged again, so it also repairs the runs of trials that
        finished while the driver was down.
        """
        from platform import tracking

        run_id = self.run_for(trial_id, config)
        client = self._client()
        path = last_result.get(CHECKPOINT_PATH_KEY)
        last_epoch = int(last_result.get("epoch", 0))
        final: dict[str, Any] = {}
        if path:
            with checkpoint_dir(path, self.storage_path) as d:
                logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
                history = tracking.read_history(d) if (d / "history.json").is_file() else []
                missing = [row for row in history if int(row["epoch"]) not in logged]
                if missing:
                    tracking.log_epoch_metrics(run_id, missing, tracking_uri=self.tracking_uri)
                if (d / "metrics.json").is_file():
                    final = json.loads((d / "metrics.json").read_text())
                tracking.log_run_artifacts(run_id, d, tracking_uri=self.tracking_uri)
            self._log_effective_n_ctx(trial_id, run_id, path)
        final_metrics = {k: final[k] for k in FINAL_KEYS if k in final}
        started = self._started.pop(trial_id, None)
        if started is not None:
            final_metrics["trial_wall_s"] = time.monotonic() - started
        if final_metrics:
            tracking.log_final_metrics(run_id, final_metrics, step=last_epoch, tracking_uri=self.tracking_uri)
        stopped_early = last_epoch < self.epochs
        client.set_tag(run_id, EARLY_STOPPED_TAG, str(stopped_early).lower())
        tracking.end_run(run_id, "FINISHED", tracking_uri=self.tracking_uri)
        how = f"stopped early by ASHA after epoch {last_epoch}" if stopped_early else "finished"
        val = last_result.get("val_acc")
        logger.info("trial %s %s: val_acc %s%s", trial_id, how, f"{val:.2f}" if val is not None else "-",
                    f", test_acc {final['test_acc']:.2f}" if "test_acc" in final else "")
        return run_id


# ----------------------------------------------------------------------------------------------------------------
# Stopping trials cleanly (see the module docstring)
# ----------------------------------------------------------------------------------------------------------------


class TrialReportCallback(TuneReportCallback):
    """``TuneReportCallback`` minus the worker's ``done`` flag (the trial ends when its trainer returns)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [{k: v for k, v in m.items() if k != "done"} for m in metrics], checkpoint)


@ray.remote(num_cpus=0)
class TrialControllersActor:
    """The sweep's registry of trial controllers (one named actor per sweep driver): stop them, reap their groups."""

    def __init__(self, interval_s: float = REAPER_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._live: dict[str, tuple[Any, list[Any]]] = {}  # trial id -> (controller handle, placement groups)
        self._stopped: set[str] = set()
        self._task: Any = None
        self.counts = {"registered": 0, "released": 0, "stopped": 0, "reaped": 0}

    async def register(self, trial_id: str, controller: Any, placement_group: Any) -> None:
        self._live.setdefault(trial_id, (controller, []))[1].append(placement_group)
        self.counts["registered"] += 1
        if self._task is None:
            import asyncio

            self._task = asyncio.get_running_loop().create_task(self._watch())  # keep a reference: not collected

    async def release(self, trial_id: str) -> None:
        """The trial's controller shuts down by itself: forget it."""
        if self._live.pop(trial_id, None) is not None:
            self.counts["released"] += 1

    async def stop(self, trial_id: str) -> bool:
        """Abort the trial's Ray Train run (workers and placement group go first); False if it is not running."""
        from ray.exceptions import RayActorError

        self._stopped.add(trial_id)
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return False
        controller, groups = entry
        self.counts["stopped"] += 1
        try:
            await controller.abort.remote()
        except RayActorError:
            pass  # abort() ends with the controller exiting
        self._remove(groups)
        return True

    async def was_stopped(self, trial_id: str) -> bool:
        return trial_id in self._stopped

    async def stats(self) -> dict[str, int]:
        """Controllers registered, released (clean shutdown), stopped (aborted) and placement groups reaped."""
        return dict(self.counts)

    def _remove(self, groups: list[Any]) -> None:
        from ray.util.placement_group import placement_group_table, remove_placement_group

        for group in groups:
            if placement_group_table(group).get("state") in ("REMOVED", None):
                continue
            try:
                remove_placement_group(group)
                self.counts["reaped"] += 1
            except Exception as err:  # removed meanwhile
                logger.debug("placement group %s: %s", group.id, err)

    async def _watch(self) -> None:
        """Safety net: remove the placement groups of controllers that died without shutting down."""
        import asyncio

        from ray.exceptions import ActorDiedError

        while True:
            await asyncio.sleep(self._interval_s)
            for trial_id, (controller, groups) in list(self._live.items()):
                try:
                    await asyncio.wait_for(controller.__ray_ready__.remote(), 30)
                    continue  # alive
                except ActorDiedError:
                    pass
                except Exception as err:  # busy or unreachable for now: look again next round
                    logger.debug("trial %s: controller not answering (%s)", trial_id, type(err).__name__)
                    continue
                if self._live.pop(trial_id, None) is not None:
                    try:
                        self._remove(groups)
                    except Exception:  # never let the watch loop die
                        logger.exception("trial %s: cannot remove its placement groups", trial_id)


class TrialControllerCallback(ControllerCallback, WorkerGroupCallback):
    """Ray Train callback: registers a trial's controller and worker placement group with the sweep's registry."""

    def __init__(self, trial_id: str, registry_name: str = REGISTRY_NAME) -> None:
        self.trial_id = trial_id
        self.registry_name = registry_name
        self._registry: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        try:
            self._registry = ray.get_actor(self.registry_name)
        except ValueError:
            logger.warning("no trial registry %r: a stopped trial may hold its workers' CPUs", self.registry_name)

    def after_worker_group_start(self, worker_group: Any) -> None:
        if self._registry is None:
            return
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        ray.get(self._registry.register.remote(self.trial_id, controller, group))

    async def before_controller_shutdown(self) -> None:
        if self._registry is not None:
            self._registry.release.remote(self.trial_id)
            self._registry = None


class GracefulASHA(ASHAScheduler):
    """ASHA whose stop decisions first abort the trial's Ray Train run, so its workers are released cleanly.

    At the last epoch ASHA would also say STOP; there the trial is left to return by itself instead.
    """

    def __init__(self, *, registry_name: str = REGISTRY_NAME, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry_name = registry_name

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != self.STOP:
            return decision
        if result.get(self._time_attr, 0) >= self._max_t:
            return self.CONTINUE  # finished: the trainer returns on its own
        try:
            registry = ray.get_actor(self.registry_name)
            ray.get(registry.stop.remote(trial.trial_id), timeout=120)
        except Exception as err:  # the registry's watch loop still reaps the placement group
            logger.warning("trial %s: clean stop failed (%s); Tune stops it", trial.trial_id, err)
        return decision
