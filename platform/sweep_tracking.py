"""A sweep in MLflow: every trial an MLflow child run of the sweep's parent run, logged from the driver.

:class:`MlflowSweepCallback` is a Ray Tune callback; Tune calls callbacks in the driver process, so the SQLite store
has exactly one writer. It keeps no state that matters across a driver restart: it finds a trial's run by the
``coop.trial_id`` tag under the parent run, so a resumed sweep continues the same runs
(:meth:`MlflowSweepCallback.finish_from_result` closes the runs of trials that finished while no driver was watching).
It also prints one progress line per trial event.

Per trial run: the full resolved config as params (plus the effective context length), per-epoch metrics with
``step = epoch``, the final epoch's test and zero-shot accuracy, the final checkpoint's artifacts (prompts as
safetensors, config JSON, nearest-words table, history) and where the trial's time went
(``platform.artifacts.WORKER_TIMING_KEYS`` measured by the worker, ``TRIAL_TIMING_KEYS`` measured here): queue wait,
process start-up, model and feature loading, the training loop, evaluation, reporting and MLflow logging.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from platform import artifacts
from platform.tracking import EARLY_STOPPED_TAG, SWEEP_TAG, TRIAL_TAG
from platform.trials import searched_overrides, trial_spec
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 30.0  # after a tracking failure, MLflow is tried again this much later
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback reports


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


def trial_checkpoint_path(trial_or_result: Any, metrics: Mapping[str, Any]) -> str | None:
    """Where a trial's latest checkpoint is: Tune's own (single-worker trials) or its Ray Train run's."""
    if metrics.get(CHECKPOINT_PATH_KEY):
        return metrics[CHECKPOINT_PATH_KEY]
    checkpoint = getattr(trial_or_result, "checkpoint", None)
    return checkpoint.path if checkpoint is not None else None


@contextmanager
def checkpoint_dir(path: str, storage_path: str) -> Iterator[Path]:
    """A local directory with the checkpoint at ``path`` (a path on ``storage_path``'s filesystem), verified against
    its manifest (``artifacts.verify``)."""
    from ray.train import Checkpoint

    if "://" in storage_path:
        import pyarrow.fs

        fs, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        checkpoint = Checkpoint(path=path, filesystem=fs)
    else:
        checkpoint = Checkpoint(path=path)
    with checkpoint.as_directory() as d:
        artifacts.verify(d)
        yield Path(d)


def trial_description(trial_id: str, config: Mapping[str, Any], *, sweep_name: str, experiment_id: str,
                      parent_run_id: str, run_id: str, outcome: str | None = None,
                      last_result: Mapping[str, Any] | None = None, checkpoint: str | None = None) -> str:
    """The trial run's Markdown description: what it tried, how it ended, links to its config and checkpoint."""
    from platform import tracking

    lines = [f"**Trial `{trial_id}`** of sweep [{sweep_name}]({tracking.run_link(experiment_id, parent_run_id)}): "
             f"`{describe_config(config) or 'no searched values'}`", ""]
    if outcome:
        result = last_result or {}
        accs = [f"{k} {result[k]:.2f} %" for k in artifacts.ACCURACY_KEYS if result.get(k) is not None]
        lines.append(f"- {outcome}" + (f": {', '.join(accs)}" if accs else ""))
    else:
        lines.append("- running")
    config_link = tracking.artifact_link(experiment_id, run_id, artifacts.CONFIG_FILE)
    lines.append(f"- config: [{artifacts.CONFIG_FILE}]({config_link}) (the resolved configuration; the same values "
                 "are this run's params)")
    if checkpoint:
        lines.append(f"- Ray checkpoint: `{checkpoint}`")
    return "\n".join(lines)


def error_line(error: BaseException | str | None) -> str:
    """The last non-empty line of an error (a Ray error's message ends with the worker's exception), for one line."""
    if error is None:
        return "error (see the trial's Ray logs)"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def trial_timing(last_result: Mapping[str, Any], *, created_at: float | None, ended_at: float,
                 tracking_s: float) -> dict[str, float]:
    """Where a trial's time went (``TRIAL_TIMING_KEYS``), from its last report and the driver's wall-clock stamps.

    Args:
        last_result: the trial's last report (``entered_at``, ``process_created_at`` and the worker's timings).
        created_at: when the driver first saw the trial (None after a driver restart: no queue or wall time).
        ended_at: when it ended.
        tracking_s: the driver's MLflow logging time for it.
    """
    out: dict[str, float] = {"time_tracking_s": tracking_s}
    entered = last_result.get(artifacts.ENTERED_AT_KEY)
    busy = last_result.get("time_train_loop_s", 0.0) + last_result.get("time_eval_s", 0.0)
    if created_at is None or entered is None:
        return out
    process = last_result.get(artifacts.PROCESS_CREATED_AT_KEY)
    process_start = max(0.0, entered - max(process, created_at)) if process is not None else 0.0
    wall = max(0.0, ended_at - created_at)
    out.update(time_queue_s=max(0.0, entered - created_at - process_start), time_process_start_s=process_start,
               time_trial_wall_s=wall, time_overhead_s=max(0.0, wall - busy),
               overhead_share=max(0.0, wall - busy) / wall if wall > 0 else 0.0)
    return out


class MlflowSweepCallback(Callback):
    """Log each trial as an MLflow child run of ``parent_run_id`` (see the module docstring).

    Args:
        parent_run_id: the sweep's run.
        experiment: MLflow experiment of the child runs.
        tracking_uri: the tracking store (a SQLite URI by default).
        base_spec: ``RunSpec.to_dict()`` of the sweep; a trial's spec is this with the trial's searched values.
        storage_path: where the trials' checkpoints live (to read their files).
        epochs: epochs per trial (for progress lines and the early-stopped tag) when a trial's report does not say
            its own (``artifacts.EPOCHS_TOTAL_KEY``).
        sweep_name: tagged on every child run.
        resume_command: the sweep's ``--resume`` command (``platform.sweep.state.resume_command``), which logs what
            MLflow missed once it is back.
    """

    def __init__(self, *, parent_run_id: str, experiment: str, tracking_uri: str, base_spec: Mapping[str, Any],
                 storage_path: str, epochs: int, sweep_name: str, resume_command: str) -> None:
        self.parent_run_id = parent_run_id
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.base_spec = dict(base_spec)
        self.storage_path = storage_path
        self.epochs = epochs
        self.sweep_name = sweep_name
        self.resume_command = resume_command
        self.stopping = False  # set when the user interrupts the sweep (Ctrl-C): trials stopped now did not end
        self._reset_caches()

    def _reset_caches(self) -> None:
        self.unlogged: set[str] = set()  # trials with an event MLflow did not take (logged again when it is back)
        self.outage: str | None = None  # the last tracking error this driver met, one line
        self._down_until = 0.0  # time.monotonic() before which MLflow is not tried again
        self._runs: dict[str, str] = {}
        self._params_done: set[str] = set()
        self._created: dict[str, float] = {}  # wall-clock time the driver first saw each trial
        self._tracking_s: dict[str, float] = {}
        self._logged: dict[str, set[int]] = {}  # epochs logged per trial by this driver
        self.timings: dict[str, dict[str, float]] = {}  # trial id -> worker and trial timings, once it ended
        self.windows: dict[str, tuple[float, float]] = {}  # trial id -> (created, ended) wall-clock times
        self._experiment_id: str | None = None

    # -- bookkeeping ------------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:  # pickled into the Tuner's state: no run caches
        state = self.__dict__.copy()
        for key in ("_runs", "_params_done", "_created", "_tracking_s", "_logged", "timings", "windows",
                    "_experiment_id", "unlogged", "outage", "_down_until"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _describe(self, trial_id: str, run_id: str, config: Mapping[str, Any], **outcome: Any) -> None:
        from platform import tracking

        if self._experiment_id is None:
            self._experiment_id = self._client().get_run(self.parent_run_id).info.experiment_id
        text = trial_description(trial_id, config, sweep_name=self.sweep_name, experiment_id=self._experiment_id,
                                 parent_run_id=self.parent_run_id, run_id=run_id, **outcome)
        tracking.set_description(run_id, text, tracking_uri=self.tracking_uri)

    @contextmanager
    def _tracking(self, trial_id: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._tracking_s[trial_id] = self._tracking_s.get(trial_id, 0.0) + time.perf_counter() - t0

    def child_runs(self) -> dict[str, Any]:
        """The existing child runs of the parent, by trial id."""
        client = self._client()
        parent = client.get_run(self.parent_run_id)
        runs = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10_000,
        )
        return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}

    def run_for(self, trial_id: str, config: Mapping[str, Any]) -> str:
        """The child run of ``trial_id``, created (with the trial's resolved config as params) if needed."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        from platform import tracking

        existing = self.child_runs().get(trial_id)
        if existing is not None:
            run_id = existing.info.run_id
            history = self._client().get_metric_history(run_id, "train_loss")
            self._logged.setdefault(trial_id, set()).update(int(m.step) for m in history)
            if all(param in existing.data.params for param in artifacts.RESOLVED_PARAMS.values()):
                self._params_done.add(trial_id)
        else:
            tags = {TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep_name, "coop.searched": describe_config(config)}
            run_id = tracking.create_run(self.experiment, run_name=f"trial-{trial_id}", tags=tags,
                                         parent_run_id=self.parent_run_id, tracking_uri=self.tracking_uri)
            params = tracking.flatten_params(trial_spec(self.base_spec, config)) | {"trial_id": trial_id}
            tracking.log_params(run_id, params, tracking_uri=self.tracking_uri)
            self._describe(trial_id, run_id, config)
        self._runs[trial_id] = run_id
        return run_id

    def _log_resolved_params(self, trial_id: str, run_id: str, result: Mapping[str, Any]) -> None:
        """Log what the worker decided (``artifacts.RESOLVED_PARAMS``: the effective context length, which
        ``ctx_init``'s word count decides, and the text sharding used) as params, once, from the trial's report."""
        if trial_id in self._params_done or not all(k in result for k in artifacts.RESOLVED_PARAMS):
            return
        from mlflow.entities import Param

        params = [Param(param, str(result[key])) for key, param in artifacts.RESOLVED_PARAMS.items()]
        self._client().log_batch(run_id, params=params)
        self._params_done.add(trial_id)

    # -- when MLflow goes away --------------------------------------------------------------------------------------

    def log_command(self) -> str:
        """The command that logs this sweep's unlogged results once the tracking server is back (``--resume`` of a
        finished sweep runs nothing again: it only logs what is missing and registers the best trial once)."""
        return self.resume_command

    def _safely(self, trial_id: str, what: str, log: Callable[[], Any]) -> Any:
        """Run ``log`` (MLflow calls for ``trial_id``); if the store fails, note the trial and go on.

        A sweep must not stop, or lose a trial, because its tracking server went away: every trial's metrics, history
        and artifacts are in its checkpoint under the sweep folder, and :meth:`finish_from_result` logs them from
        there later (idempotently). After a failure MLflow is left alone for ``RETRY_AFTER_S``, so a dead server
        costs one timeout, not one per event.
        """
        if time.monotonic() < self._down_until:
            self.unlogged.add(trial_id)
            return None
        try:
            return log()
        except Exception as err:  # whatever the store raises (connection, HTTP, database errors): never the sweep's
            first = self.outage is None
            self.outage = error_line(err)
            self._down_until = time.monotonic() + RETRY_AFTER_S
            self.unlogged.add(trial_id)
            if first:
                logger.warning("could not log %s of trial %s to MLflow at %s (%s): the sweep goes on and every "
                               "trial's results stay in its checkpoint under the sweep folder; they are logged when "
                               "the store works again, or later with: %s", what, trial_id, self.tracking_uri,
                               self.outage, self.log_command())
            else:
                logger.warning("MLflow still unavailable: %s of trial %s not logged yet", what, trial_id)
            return None

    # -- Tune hooks ---------------------------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Pick up the child runs of a resumed sweep, with the epochs they already logged."""
        def pick_up() -> None:
            client = self._client()
            for tid, run in self.child_runs().items():
                self._runs[tid] = run.info.run_id
                self._logged[tid] = {int(m.step) for m in client.get_metric_history(run.info.run_id, "train_loss")}

        self._safely("-", "the existing runs", pick_up)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        for trial in trials:
            self._created.setdefault(trial.trial_id, now)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._created.setdefault(trial.trial_id, time.time())

        def start() -> None:
            with self._tracking(trial.trial_id):
                run_id = self.run_for(trial.trial_id, trial.config)
                if self._client().get_run(run_id).info.status != "RUNNING":  # a resumed trial
                    self._client().update_run(run_id, status="RUNNING")

        self._safely(trial.trial_id, "the start", start)
        logger.info("trial %s started: %s", trial.trial_id, describe_config(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result or artifacts.FAILURE_KEY in result:
            return  # a diverged trial's last report: closed by on_trial_complete
        from platform import tracking

        epoch = int(result["epoch"])
        logged = self._logged.setdefault(trial.trial_id, set())
        if epoch in logged:
            return  # a retried trial that resumed from an earlier checkpoint repeats an epoch: logged once
        def log_epoch() -> None:
            with self._tracking(trial.trial_id):
                run_id = self.run_for(trial.trial_id, trial.config)
                row = {k: result[k] for k in artifacts.EPOCH_KEYS if k in result}
                tracking.log_epoch_metrics(run_id, [row], tracking_uri=self.tracking_uri)
                self._log_resolved_params(trial.trial_id, run_id, result)
            logged.add(epoch)  # not reached when MLflow failed: finish_from_result logs it from the checkpoint

        self._safely(trial.trial_id, f"epoch {epoch}", log_epoch)
        val = f" val_acc {result['val_acc']:.2f}" if "val_acc" in result else ""
        test = f" test_acc {result['test_acc']:.2f}" if "test_acc" in result else ""
        logger.info("trial %s epoch %d/%d: loss %.4f%s%s", trial.trial_id, int(result["epoch"]),
                    int(result.get(artifacts.EPOCHS_TOTAL_KEY, self.epochs)),
                    result.get("train_loss", math.nan), val, test)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.stopping:
            return  # stopped by Ctrl-C, not ended: the CLI marks its run KILLED and --resume continues it
        last = trial.last_result or {}
        self._safely(trial.trial_id, "the results", lambda: self.finish_from_result(
            trial.trial_id, trial.config, last, trial_checkpoint_path(trial, last)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = error_line(trial.get_error())
        logger.warning("trial %s failed: %s (see its Ray logs)", trial.trial_id, reason)
        run_id = self._safely(trial.trial_id, "the failure", lambda: self.mark_failed(trial.trial_id, trial.config,
                                                                                     reason))
        if run_id is not None:
            logger.warning("MLflow run %s of trial %s marked FAILED", run_id, trial.trial_id)

    def mark_failed(self, trial_id: str, config: Mapping[str, Any], reason: str) -> str:
        """End a trial's run FAILED, with ``reason`` as its ``coop.failure`` tag; returns the run id."""
        from platform import tracking

        run_id = self.run_for(trial_id, config)
        tracking.set_tag(run_id, tracking.FAILURE_TAG, reason, tracking_uri=self.tracking_uri)
        tracking.end_run(run_id, "FAILED", tracking_uri=self.tracking_uri)
        self.unlogged.discard(trial_id)
        return run_id

    # -- closing a trial's run ----------------------------------------------------------------------------------------

    def finish_from_result(self, trial_id: str, config: Mapping[str, Any], last_result: Mapping[str, Any],
                           checkpoint_path: str | None) -> str:
        """Close a trial's run from its last result: missing epochs, final metrics, timings, artifacts, FINISHED
        (FAILED with the reason as the ``coop.failure`` tag when the trial reported a failure).

        Idempotent: epochs already in MLflow are not logged again, so it also repairs the runs of trials that
        finished while the driver was down.
        """
        from platform import tracking

        ended_at = time.time()
        t0 = time.perf_counter()
        run_id = self.run_for(trial_id, config)
        client = self._client()
        last_epoch = int(last_result.get("epoch", 0))
        if checkpoint_path:
            with checkpoint_dir(checkpoint_path, self.storage_path) as d:
                logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
                missing = [row for row in artifacts.read_history(d) if int(row["epoch"]) not in logged]
                if missing:
                    tracking.log_epoch_metrics(run_id, missing, tracking_uri=self.tracking_uri)
                tracking.log_run_artifacts(run_id, d, tracking_uri=self.tracking_uri)
        self._log_resolved_params(trial_id, run_id, last_result)
        final = {k: last_result[k] for k in (*artifacts.final_keys(last_result), *artifacts.WORKER_TIMING_KEYS)
                 if k in last_result}
        tracking_s = self._tracking_s.pop(trial_id, 0.0) + time.perf_counter() - t0
        created_at = self._created.pop(trial_id, None)
        if created_at is not None:
            self.windows[trial_id] = (created_at, ended_at)
        timing = trial_timing(last_result, created_at=created_at, ended_at=ended_at, tracking_s=tracking_s)
        final |= timing
        tracking.log_final_metrics(run_id, final, step=last_epoch, tracking_uri=self.tracking_uri)
        self.timings[trial_id] = {k: final[k] for k in (*artifacts.WORKER_TIMING_KEYS, *artifacts.TRIAL_TIMING_KEYS)
                                  if k in final}
        failure = last_result.get(artifacts.FAILURE_KEY)
        if failure:
            self.mark_failed(trial_id, config, str(failure))
            self.unlogged.discard(trial_id)
            logger.warning("trial %s failed after epoch %d: %s (MLflow run %s marked FAILED)", trial_id, last_epoch,
                           failure, run_id)
            return run_id
        epochs = int(last_result.get(artifacts.EPOCHS_TOTAL_KEY, self.epochs))  # a study's trials differ by shots
        stopped_early = last_epoch < epochs
        client.set_tag(run_id, EARLY_STOPPED_TAG, str(stopped_early).lower())
        if checkpoint_path:
            client.set_tag(run_id, tracking.CHECKPOINT_TAG, checkpoint_path)
        how = f"stopped early by ASHA after epoch {last_epoch}" if stopped_early else "finished"
        self._describe(trial_id, run_id, config, last_result=last_result, checkpoint=checkpoint_path,
                       outcome=(f"{how} of {epochs}" if stopped_early else f"ran all {epochs} epochs"))
        tracking.end_run(run_id, "FINISHED", tracking_uri=self.tracking_uri)
        self.unlogged.discard(trial_id)
        val = last_result.get("val_acc")
        logger.info("trial %s %s: val_acc %s%s", trial_id, how, f"{val:.2f}" if val is not None else "-",
                    f", test_acc {final['test_acc']:.2f}" if "test_acc" in final else "")
        return run_id
