"""Load: a sweep of many more trials than slots (64 trials of 1 epoch, 2 at a time, tiny backbone) accounts for every
trial in MLflow (64 child runs, none RUNNING) and the driver's memory does not grow with the trial count.

Marked ``load`` (about 3 minutes on 2 cores): the default ``pytest`` run skips it, ``.ci/run`` runs it after the
suite (``pytest -m load``). The driver is the plain CLI in a subprocess; its peak RSS (``VmHWM``) is read from
``/proc`` when the 8th and the 64th trial end, and printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.load]

REPO = Path(__file__).resolve().parents[2]
TRIALS = 64
ENDED = re.compile(r"trial \S+ (finished|stopped early)")
MAX_GROWTH_BYTES = 64 * 1024**2  # peak RSS after trial 64 minus after trial 8


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def test_64_trials_two_at_a_time_are_all_tracked_and_the_driver_does_not_grow(small_eurosat_root, tiny_vit_config,
                                                                             tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "-m", "platform.tune", "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
            "--backbone", tiny_vit_config, "--pretrained", "none", "--shots", "1", "--epochs", "1", "--n-views", "1",
            "--batch-size", "8", "--max-test-items", "20", "--num-samples", str(TRIALS), "--max-concurrent", "2",
            "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "ray"), "--tracking-uri", uri,
            "--sweep-name", "load", "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    at: dict[int, dict[str, int]] = {}
    stderr: list[str] = []

    def watch() -> None:  # the driver logs one line per ended trial on stderr
        for line in proc.stderr:
            stderr.append(line)
            if ENDED.search(line):  # (Ray may print on the same line first)
                n = len(at) + 1
                at[n] = _memory(proc.pid)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.stdout.read()  # (stderr is the watcher's alone)
    proc.wait(timeout=1500)
    watcher.join(timeout=30)
    assert proc.returncode == 0, out[-2000:] + "".join(stderr[-60:])
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trials"] == TRIALS and summary["trials_completed"] == TRIALS and summary["trials_errored"] == 0

    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(children) == TRIALS and len({c.data.tags["coop.trial_id"] for c in children}) == TRIALS
    assert {c.info.status for c in children} == {"FINISHED"} and parent.info.status == "FINISHED"

    assert sorted(at) == list(range(1, TRIALS + 1)), "".join(stderr)[-5000:]
    peak8, peak64 = at[8]["VmHWM"], at[TRIALS]["VmHWM"]
    print(f"\ndriver peak RSS: {peak8 / 2**20:.0f} MiB at trial 8, {peak64 / 2**20:.0f} MiB at trial {TRIALS} "
          f"(RSS {at[8]['VmRSS'] / 2**20:.0f} -> {at[TRIALS]['VmRSS'] / 2**20:.0f} MiB); sweep "
          f"{summary['wall_s']:.0f} s, {summary['timing']['trials_per_hour']:.0f} trials/hour")
    assert peak64 - peak8 < MAX_GROWTH_BYTES, (peak8, peak64)
