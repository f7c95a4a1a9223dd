"""Waiting for a server a test started (``mlflow server``, ``mlflow models serve``) to answer on 127.0.0.1."""

from __future__ import annotations

import subprocess
import time
import urllib.request
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
