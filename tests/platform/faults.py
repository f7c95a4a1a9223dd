"""Faults (and probes) the platform tests inject through ``platform.worker.run_training``'s ``epoch_hooks`` seam.

Hooks travel to Ray workers pickled; :func:`picklable` registers this module to be pickled by value, since the test
tree is not importable inside a worker.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


def picklable() -> None:
    """Ship this module's classes to Ray workers by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class FailOnce:
    """Raise once after ``epoch``'s report on ``rank``; ``flag_file`` records that it happened (and stops a repeat)."""

    epoch: int
    rank: int
    flag_file: str
    kill: bool = False  # SIGKILL the process instead of raising
    delay_s: float = 0.0  # wait this long first, e.g. until Ray Train's controller has taken the epoch's report

    def __call__(self, epoch: int, rank: int) -> None:
        if epoch != self.epoch or rank != self.rank:
            return
        flag = Path(self.flag_file)
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins, even in a race
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(f"failed at epoch {epoch} on rank {rank} (pid {os.getpid()})\n")
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank} (test fault injection)")


@dataclass(frozen=True)
class Pause:
    """Sleep ``seconds`` after every epoch's report: slows trials down so a test can interrupt a sweep mid-way."""

    seconds: float

    def __call__(self, epoch: int, rank: int) -> None:
        import time

        time.sleep(self.seconds)


@dataclass(frozen=True)
class KillGroupAfter:
    """SIGKILL the process group ``pgid`` (e.g. a tracking server) at the ``calls``-th epoch end of the whole sweep.

    Epoch ends are counted in ``counter_file`` (one line each, across trials and processes), so "during the second
    trial" is ``calls = epochs + 1`` when trials run one at a time.
    """

    calls: int
    pgid: int
    counter_file: str

    def __call__(self, epoch: int, rank: int) -> None:
        with open(self.counter_file, "a+") as fh:
            fh.write(f"{epoch}\n")
            fh.seek(0)
            n = len(fh.read().splitlines())
        if n == self.calls:
            os.killpg(self.pgid, signal.SIGKILL)


def tune_main_with_hooks() -> None:
    """Child-process entry point: ``platform.tune.main(argv)`` with epoch hooks given as JSON in ``argv[1]``.

    ``python -c "import sys; sys.path.insert(0, 'tests/platform'); import faults; faults.tune_main_with_hooks()"
    '[{"pause": 0.5}]' --dataset ...`` from the repository root (so ``platform`` is this package).
    """
    import functools
    import json
    import sys
    from platform import tune
    from platform.sweep import run as sweep_run

    kinds = {"pause": lambda v: Pause(float(v)), "fail_once": lambda v: FailOnce(**v)}
    hooks = [kinds[kind](value) for item in json.loads(sys.argv[1]) for kind, value in item.items()]
    picklable()
    sweep_run.build_tuner = functools.partial(sweep_run.build_tuner, epoch_hooks=hooks)
    sys.exit(tune.main(sys.argv[2:]))


@dataclass(frozen=True)
class RecordWhere:
    """After the first epoch, write where this worker runs (Ray node, trial, rank, ``platform`` package) to a file."""

    directory: str

    def __call__(self, epoch: int, rank: int) -> None:
        if epoch != 1:
            return
        import json
        import platform

        import ray

        ctx = ray.get_runtime_context()
        info = {"node_id": ctx.get_node_id(), "rank": rank, "pid": os.getpid(), "platform_file": platform.__file__}
        Path(self.directory, f"{os.getpid()}-{rank}-{id(info)}.json").write_text(json.dumps(info))
