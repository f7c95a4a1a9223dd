"""Progress bars where a person waits, drawn by the driver on stderr: feature extraction, epochs, trials.

The work happens in Ray worker processes, whose output reaches the console only as forwarded log lines (a bar
drawn there would arrive as a stream of broken lines). So workers *report* progress and the driver *draws* it:

- :class:`ProgressBoard` is a small Ray actor holding the latest ``(done, total)`` of each task ("features",
  "epochs"). Workers update it fire-and-forget through :func:`board_reporter`, throttled, so a report never waits.
- :class:`ConsoleProgress` runs in the driver: it polls the board twice a second and draws one ``tqdm`` bar per
  task, and the driver's own bars (the sweep's trials) go through :meth:`ConsoleProgress.bar`. While bars are shown,
  our log lines are printed above them (``tqdm.contrib.logging``), so the lines and the bars stay readable.

Bars are off when stderr is not a terminal, with ``--json`` and with ``--verbose`` (whose library logs would tear
them); then nothing is polled or drawn and the board is never created. ``coop_core`` knows nothing of this: it takes a
plain ``progress(task, done, total)`` callback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from platform.artifacts import EPOCHS_TOTAL_KEY
from platform.sweep import packs
from typing import Any

import ray
from ray.tune import Callback

ProgressFn = Callable[[str, int, int], None]  # (task, done, total), as coop_core's progress callbacks take it

POLL_S = 0.5  # how often the driver redraws the worker-side bars
MIN_INTERVAL_S = 0.2  # a worker sends at most this often per task (and always the last step)


def bars_wanted(*, json_output: bool, verbose: bool, stream: Any = None) -> bool:
    """Whether to draw bars: only for a person at a terminal (stderr a TTY), not with --json or --verbose."""
    stream = sys.stderr if stream is None else stream
    return not json_output and not verbose and bool(getattr(stream, "isatty", lambda: False)())


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress of each task, written by workers, read by the driver."""

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[int, int]] = {}

    def update(self, task: str, done: int, total: int) -> None:
        self._tasks[task] = (done, total)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self._tasks)


def board_reporter(board: Any, prefix: str = "") -> ProgressFn:
    """A ``progress(task, done, total)`` callback for a worker that sends to ``board`` (None: a no-op)."""
    last: dict[str, float] = {}

    def report(task: str, done: int, total: int) -> None:
        if board is None:
            return
        now = time.monotonic()
        if done < total and task in last and now - last[task] < MIN_INTERVAL_S:
            return
        last[task] = now
        board.update.remote(prefix + task, int(done), int(total))

    return report


class ConsoleProgress:
    """The driver's bars (see the module docstring). Use as a context manager; ``enabled=False`` draws nothing.

    Args:
        enabled: draw bars (see :func:`bars_wanted`).
        labels: the bar title of each worker task (``{"features": "image features"}``); others use the task name.
        loggers: our loggers whose lines are printed above the bars while they are shown.
    """

    def __init__(self, enabled: bool, *, labels: dict[str, str] | None = None,
                 loggers: tuple[str, ...] = ("platform", "coop_core")) -> None:
        self.enabled = enabled
        self.labels = dict(labels or {})
        self.loggers = loggers
        self.board: Any = None
        self._bars: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ConsoleProgress:
        if not self.enabled:
            return self
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._stack.enter_context(logging_redirect_tqdm([logging.getLogger(n) for n in self.loggers]))
        self.board = ProgressBoard.remote()
        self._thread = threading.Thread(target=self._poll, name="coop-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._draw()  # the last state, so a finished bar shows its total
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
        if self.board is not None:
            ray.kill(self.board)
            self.board = None
        self._stack.close()

    def bar(self, key: str, *, total: int, desc: str, unit: str = "it") -> Any:
        """A bar the driver updates itself (``.update(n)``, ``.set_postfix_str(s)``); a silent stand-in when off."""
        if not self.enabled:
            return _NoBar()
        from tqdm import tqdm

        with self._lock:
            self._bars[key] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                                   position=len(self._bars), leave=True)
            return self._bars[key]

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._draw()

    def _draw(self) -> None:
        if self.board is None:
            return
        from tqdm import tqdm

        try:
            tasks = ray.get(self.board.snapshot.remote(), timeout=5)
        except Exception:  # the board is going away with Ray: nothing more to draw
            return
        with self._lock:
            order = list(self.labels)  # bars in the order the work happens (features before epochs)
            for task, (done, total) in sorted(tasks.items(), key=lambda kv: (_rank(kv[0], order), kv[0])):
                bar = self._bars.get(task)
                if bar is None:
                    label = self.labels.get(task.rsplit(":", 1)[-1], task)
                    bar = self._bars[task] = tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True,
                                                  position=len(self._bars), leave=True)
                if bar.total != total:
                    bar.total = total
                bar.n = done
                bar.refresh()


def _rank(task: str, order: list[str]) -> int:
    name = task.rsplit(":", 1)[-1]
    return order.index(name) if name in order else len(order)


class _NoBar:
    """What :meth:`ConsoleProgress.bar` gives when bars are off: accepts the calls, draws nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class TrialBar(Callback):
    """The sweep's trial bar: trials ended of the total, with running / finished / ASHA-stopped / errored counts and
    the best validation accuracy so far. A Ray Tune callback (Tune calls it in the driver); draws through
    :meth:`ConsoleProgress.bar`, so it is silent when bars are off.

    Args:
        progress: the driver's bars.
        total: trials in the sweep.
        epochs: epochs per trial (a trial that ends before them was stopped by ASHA).
        metric: the metric whose best value is shown.
    """

    def __init__(self, progress: ConsoleProgress, total: int, epochs: int, metric: str) -> None:
        self.epochs, self.metric = epochs, metric
        self.best: float | None = None
        self.counts = {"finished": 0, "stopped": 0, "errored": 0}
        self._running: set[str] = set()
        self._bar = progress.bar("trials", total=total, desc="trials", unit="trial")

    def __reduce__(self):  # Tune pickles its callbacks into the sweep's state: no bar in there
        return (Callback, ())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._running.update(_configuration_ids(trial))
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = float(value)
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if packs.is_packed(getattr(trial, "config", None)):  # each member counts as the trial it stands for
            reports = packs.member_reports(result)
            for mid in _configuration_ids(trial):
                status = reports.get(mid, {}).get(packs.STATUS_KEY)
                self._end(mid, "finished" if status == packs.FINISHED else "errored" if status == packs.FAILED
                          else "stopped")
            return
        epochs = int(result.get(EPOCHS_TOTAL_KEY, self.epochs))  # the trial's own (a study's differ by shots)
        self._end(trial.trial_id, "finished" if int(result.get("epoch", 0)) >= epochs else "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for tid in _configuration_ids(trial):
            self._end(tid, "errored")

    def _end(self, trial_id: str, how: str) -> None:
        self._running.discard(trial_id)
        self.counts[how] += 1
        self._bar.update(1)
        self._refresh()

    def _refresh(self) -> None:
        best = f" · best {self.metric} {self.best:.2f}" if self.best is not None else ""
        self._bar.set_postfix_str(f"running {len(self._running)} · done {self.counts['finished']} · stopped "
                                  f"{self.counts['stopped']} · errored {self.counts['errored']}{best}")


def _configuration_ids(trial: Any) -> list[str]:
    """The configurations a trial trains: itself, or a packed trial's members (``platform/sweep/packs.py``)."""
    return [cid for cid, *_ in packs.configurations(trial.trial_id, getattr(trial, "config", None))]
