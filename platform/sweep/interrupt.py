"""Ctrl-C during a sweep: stop the trials gracefully, keep their checkpoints, mark their runs KILLED."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from platform import tracking
from platform.sweep.trial_runs import error_line
from typing import Any

logger = logging.getLogger(__name__)


class SweepInterrupt:
    """Ctrl-C (SIGINT) during ``tuner.fit()``: tell the MLflow callback first, then stop Ray Tune gracefully.

    Ray Tune's own SIGINT handler stops the sweep and saves its state, but then reports the stopped trials as ended
    (``on_trial_complete``), so a callback cannot tell an interrupted trial from a finished one. So Tune's SIGINT
    handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``, read when ``fit()`` starts) and this one marks the
    callback as stopping, then sends SIGUSR1, on which Tune runs the same graceful stop. A second Ctrl-C quits at once.
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.requested = False

    def __enter__(self) -> SweepInterrupt:
        self._active = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
        if self._active:
            self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # a second Ctrl-C, or Tune's handler is not (yet, or any more) installed
        self.requested = True
        self.callback.stopping = True
        logger.warning("interrupted: stopping the trials and saving the sweep's state (Ctrl-C again to quit at once)")
        os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's graceful stop

    def __exit__(self, *exc: Any) -> None:
        if not self._active:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env


def interrupted(callback: Any, summary: Mapping[str, Any]) -> str:
    """End an interrupted sweep cleanly: the runs of the trials it stopped, and the sweep's run, end KILLED
    (``--resume`` continues them and sets them running again); nothing is registered. Returns the line that tells
    the user how to finish the sweep (the CLI prints it; exit status 130)."""
    try:
        for run in callback.runs.child_runs().values():
            if run.info.status == "RUNNING":
                tracking.end_run(run.info.run_id, "KILLED", tracking_uri=callback.tracking_uri)
        tracking.end_run(callback.parent_run_id, "KILLED", tracking_uri=callback.tracking_uri)
    except Exception as err:  # the store is gone too: --resume closes the runs later
        logger.warning("could not mark the interrupted runs in MLflow (%s)", error_line(err))
    return (f"interrupted: the sweep's {summary['trials']} trials are kept with their checkpoints; their MLflow runs "
            f"are marked KILLED. Finish the sweep with: {callback.log_command()}")
