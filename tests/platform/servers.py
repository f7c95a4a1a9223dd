"""Servers a test starts (``mlflow server``, ``mlflow models serve``): running one until the test is done, and waiting
for it to answer on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, *, what: str, timeout_s: float,
                  interval_s: float = 1.0) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not answer within {timeout_s:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(interval_s)


@contextlib.contextmanager
def running_server(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, health_url: str, what: str,
                   timeout_s: float) -> Iterator[subprocess.Popen]:
    """Start ``argv`` in its own session with its output in ``log``, wait until ``health_url`` answers, and stop the
    whole session (SIGTERM) when the block ends."""
    with open(log, "w") as out:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_up(health_url, proc, log, what=what, timeout_s=timeout_s)
        yield proc
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
