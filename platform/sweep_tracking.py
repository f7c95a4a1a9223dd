"""A sweep's MLflow logging on Ray Tune's events: :class:`MlflowSweepCallback`.

Tune calls callbacks in the driver process, so the SQLite store has exactly one writer. The callback decides *when*:
a trial's run is opened when the trial starts, each epoch is logged as it is reported, the run is closed when the
trial completes or errors; what is written is ``platform.sweep.trial_runs.TrialRuns``'s. A packed trial reports every
member's epochs since its previous report at once (``platform.pack_worker``): those epochs are logged in one batch
per member at most every ``PACK_LOG_INTERVAL_S`` seconds, whenever a member ends, and when the trial ends (one MLflow
write per member per pack epoch was the driver's main cost in a packed sweep). It also keeps the driver's timing
stamps of each trial (when Tune first showed it, the MLflow logging time) and one progress line per event.

When the store goes away (``_safely``), the sweep goes on: every trial's results stay in its checkpoint under the
sweep folder, and the runs are repaired later, by the driver once the store answers again or by the sweep's resume
command (``platform.sweep.parent_run.close_unclosed_runs``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from platform import artifacts
from platform.sweep import packs
from platform.sweep.trial_runs import TrialRuns, describe_config, error_line, trial_checkpoint_path, trial_timing
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 30.0  # after a tracking failure, MLflow is tried again this much later
PACK_LOG_INTERVAL_S = 5.0  # a packed trial's member epochs are logged together at most this often (and when it ends)


class MlflowSweepCallback(Callback):
    """Log each trial as an MLflow child run of ``parent_run_id`` (see the module docstring).

    Args:
        parent_run_id, experiment, tracking_uri, base_spec, storage_path, epochs, sweep_name: the sweep's trial runs
            (:class:`~platform.sweep.trial_runs.TrialRuns`); ``epochs`` also for the progress lines.
        resume_command: the sweep's ``--resume`` command (``platform.sweep.state.resume_command``), which logs what
            MLflow missed once it is back.
    """

    def __init__(self, *, parent_run_id: str, experiment: str, tracking_uri: str, base_spec: Mapping[str, Any],
                 storage_path: str, epochs: int, sweep_name: str, resume_command: str) -> None:
        self.runs = TrialRuns(parent_run_id=parent_run_id, experiment=experiment, tracking_uri=tracking_uri,
                              base_spec=base_spec, storage_path=storage_path, epochs=epochs, sweep_name=sweep_name)
        self.parent_run_id = parent_run_id
        self.tracking_uri = tracking_uri
        self.epochs = epochs
        self.resume_command = resume_command
        self.stopping = False  # set when the user interrupts the sweep (Ctrl-C): trials stopped now did not end
        self._reset_caches()

    def _reset_caches(self) -> None:
        self.unlogged: set[str] = set()  # trials with an event MLflow did not take (logged again when it is back)
        self.outage: str | None = None  # the last tracking error this driver met, one line
        self._down_until = 0.0  # time.monotonic() before which MLflow is not tried again
        self._created: dict[str, float] = {}  # wall-clock time the driver first saw each trial
        self._tracking_s: dict[str, float] = {}
        self.timings: dict[str, dict[str, float]] = {}  # trial id -> worker and trial timings, once it ended
        self.windows: dict[str, tuple[float, float]] = {}  # trial id -> (created, ended) wall-clock times
        self._pending: dict[str, dict[str, tuple[Mapping[str, Any], list[Mapping[str, Any]]]]] = {}  # packed trial
        # id -> member id -> (config, epoch reports not logged yet)
        self._flushed_at: dict[str, float] = {}  # packed trial id -> time.monotonic() of its last logged batch

    def __getstate__(self) -> dict[str, Any]:  # pickled into the Tuner's state: no caches
        state = self.__dict__.copy()
        for key in ("_created", "_tracking_s", "timings", "windows", "unlogged", "outage", "_down_until", "_pending",
                    "_flushed_at"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    @contextmanager
    def _tracking(self, trial_id: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._tracking_s[trial_id] = self._tracking_s.get(trial_id, 0.0) + time.perf_counter() - t0

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

    # -- closing a trial's run ----------------------------------------------------------------------------------------

    def finish_from_result(self, trial_id: str, config: Mapping[str, Any], last_result: Mapping[str, Any],
                           checkpoint_path: str | None) -> None:
        """Close a trial's run from its last result (``TrialRuns.close``), with where its time went as this driver
        measured it; the trial's timings join :attr:`timings` (and its window :attr:`windows`)."""
        ended_at = time.time()
        t0 = time.perf_counter()
        created_at = self._created.pop(trial_id, None)
        if created_at is not None:
            self.windows[trial_id] = (created_at, ended_at)

        def timing() -> dict[str, float]:  # the MLflow time so far, and this close's up to its final metrics
            tracking_s = self._tracking_s.pop(trial_id, 0.0) + time.perf_counter() - t0
            return trial_timing(last_result, created_at=created_at, ended_at=ended_at, tracking_s=tracking_s)

        final = self.runs.close(trial_id, config, last_result, checkpoint_path, timing)
        self.timings[trial_id] = {k: final[k] for k in (*artifacts.WORKER_TIMING_KEYS, *artifacts.TRIAL_TIMING_KEYS)
                                  if k in final}
        self.unlogged.discard(trial_id)

    def mark_failed(self, trial_id: str, config: Mapping[str, Any], reason: str) -> str:
        """End a trial's run FAILED with ``reason`` (``TrialRuns.mark_failed``); returns the run id."""
        run_id = self.runs.mark_failed(trial_id, config, reason)
        self.unlogged.discard(trial_id)
        return run_id

    # -- Tune hooks ---------------------------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        """Pick up the child runs of a resumed sweep, with the epochs they already logged."""
        self._safely("-", "the existing runs", self.runs.pick_up)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        for trial in trials:
            self._created.setdefault(trial.trial_id, now)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for tid, config, _, _ in packs.configurations(trial.trial_id, trial.config):
            self._created.setdefault(tid, time.time())

            def start(tid: str = tid, config: dict = config) -> None:
                with self._tracking(tid):
                    self.runs.set_running(tid, config)

            self._safely(tid, "the start", start)
            logger.info("trial %s started: %s", tid, describe_config(config))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not packs.is_packed(trial.config):
            self._log_result(trial.trial_id, trial.config, result)
            return
        pending = self._pending.setdefault(trial.trial_id, {})
        ended = False
        rows = packs.member_epochs(result)
        for tid, config, report, _ in packs.configurations(trial.trial_id, trial.config, result):
            ended |= report.get(packs.STATUS_KEY, packs.RUNNING) != packs.RUNNING
            for row in rows.get(tid, []):  # the member's epochs since the pack's previous report, this one's last
                if int(row["epoch"]) != int(report.get("epoch", -1)):
                    self._log_result(tid, config, row, pending=pending)
            self._log_result(tid, config, report, pending=pending)
        now = time.monotonic()
        if ended or now - self._flushed_at.setdefault(trial.trial_id, now) >= PACK_LOG_INTERVAL_S:
            self.flush(trial.trial_id)

    def flush(self, trial_id: str) -> None:
        """Log the member epochs of packed trial ``trial_id`` not logged yet, one batch per member."""
        self._flushed_at[trial_id] = time.monotonic()
        for tid, (config, reports) in self._pending.pop(trial_id, {}).items():
            def log_epochs(tid: str = tid, config: Mapping[str, Any] = config, reports: list = reports) -> None:
                with self._tracking(tid):
                    self.runs.log_epochs(tid, config, reports)

            self._safely(tid, f"epochs {', '.join(str(r['epoch']) for r in reports)}", log_epochs)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in list(self._pending):
            self.flush(trial_id)

    def _log_result(self, trial_id: str, config: Mapping[str, Any], result: Mapping[str, Any], *,
                    pending: dict[str, tuple[Mapping[str, Any], list[Mapping[str, Any]]]] | None = None) -> None:
        """Log (or, for a pack's member, add to ``pending``) one epoch report, and its progress line."""
        if "epoch" not in result or artifacts.FAILURE_KEY in result:
            return  # a diverged trial's last report: closed by on_trial_complete
        epoch = int(result["epoch"])
        if self.runs.epoch_logged(trial_id, epoch):
            return  # a retried trial that resumed from an earlier checkpoint repeats an epoch: logged once
        if pending is not None:
            _, waiting = pending.setdefault(trial_id, (config, []))
            if any(int(r["epoch"]) == epoch for r in waiting):
                return  # an ended member's last report, repeated in its pack's later reports
            waiting.append(result)
        else:
            def log_epoch() -> None:  # not done when MLflow failed: finish_from_result logs it from the checkpoint
                with self._tracking(trial_id):
                    self.runs.log_epochs(trial_id, config, [result])

            self._safely(trial_id, f"epoch {epoch}", log_epoch)
        val = f" val_acc {result['val_acc']:.2f}" if "val_acc" in result else ""
        test = f" test_acc {result['test_acc']:.2f}" if "test_acc" in result else ""
        logger.info("trial %s epoch %d/%d: loss %.4f%s%s", trial_id, epoch,
                    int(result.get(artifacts.EPOCHS_TOTAL_KEY, self.epochs)),
                    result.get("train_loss", math.nan), val, test)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.stopping:
            return  # stopped by Ctrl-C, not ended: the CLI marks its run KILLED and --resume continues it
        self.flush(trial.trial_id)
        last = trial.last_result or {}
        for tid, config, report, path in packs.configurations(trial.trial_id, trial.config, last,
                                                              trial_checkpoint_path(trial, last)):
            self._safely(tid, "the results", lambda tid=tid, config=config, report=report, path=path:
                         self.finish_from_result(tid, config, report, path))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = error_line(trial.get_error())
        logger.warning("trial %s failed: %s (see its Ray logs)", trial.trial_id, reason)
        self.flush(trial.trial_id)
        last = trial.last_result or {}
        for tid, config, report, path in packs.configurations(trial.trial_id, trial.config, last,
                                                              trial_checkpoint_path(trial, last)):
            if report.get(packs.STATUS_KEY) in (packs.FINISHED, packs.STOPPED):  # a pack's member that had ended
                self._safely(tid, "the results", lambda tid=tid, config=config, report=report, path=path:
                             self.finish_from_result(tid, config, report, path))
                continue
            run_id = self._safely(tid, "the failure", lambda tid=tid, config=config: self.mark_failed(tid, config,
                                                                                                   reason))
            if run_id is not None:
                logger.warning("MLflow run %s of trial %s marked FAILED", run_id, tid)
