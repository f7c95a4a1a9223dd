"""A tracking server that goes away during a sweep: the trials go on, their results stay on disk, the sweep prints
the command that logs them, and that command (run once the server is back) logs every trial exactly once and
registers the best one.

A real ``mlflow server`` (127.0.0.1, SQLite backend, proxied artifacts) runs in its own process group; a fault hook
in the trials SIGKILLs that group at the third epoch end of the sweep (three trials of two epochs, one at a time), so
later trials run and end while the server is gone.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from platform import tune
from platform.sweep import run as sweep_run

import faults
import pytest
from servers import wait_until_up

pytestmark = [pytest.mark.ray, pytest.mark.long]  # a fault test: a real server killed mid-sweep

EPOCHS = 2
GRID = "prompt.n_ctx=2,3,4"  # three trials, run one at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(store: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over ``store``; returns once it answers (its own process group)."""
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
           str(store / "artifacts"), "--workers", "1"]
    log = open(store / f"server-{time.time():.0f}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, Path(log.name), what="mlflow server", timeout_s=180,
                      interval_s=0.5)
    except AssertionError:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _tune(argv: list[str], hooks=()) -> tuple[int, str, dict]:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(sweep_run, "build_tuner", functools.partial(sweep_run.build_tuner, epoch_hooks=list(hooks)))
        rc = tune.main(argv)
    text = out.getvalue()
    return rc, text, json.loads(text.strip().splitlines()[-1])


def test_a_tracking_server_lost_mid_sweep_loses_nothing(ray_session, small_eurosat_root, feature_cache,
                                                        tiny_vit_config, tmp_path):
    from mlflow.tracking import MlflowClient

    faults.picklable()
    store = tmp_path / "server"
    store.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(store, port)
    try:
        argv = ["--dataset", "eurosat", "--data-root", str(small_eurosat_root), "--backbone", tiny_vit_config,
                "--pretrained", "none", "--shots", "2", "--epochs", str(EPOCHS), "--batch-size", "8",
                "--n-views", "1", "--max-test-items", "20", "--cache-dir", str(feature_cache),
                "--storage-path", str(tmp_path / "ray"), "--tracking-uri", uri, "--sweep-name", "outage",
                "--grid", GRID, "--max-concurrent", "1", "--json"]
        kill = faults.KillGroupAfter(calls=EPOCHS + 1, pgid=server.pid, counter_file=str(tmp_path / "epochs"))
        rc, report, summary = _tune(argv, hooks=[kill])
        server.wait(timeout=30)  # it really went away (SIGKILL) ...
        assert server.returncode == -signal.SIGKILL
        # ... and the sweep still ran every trial to its end, kept the results and says how to log them.
        assert rc == 1, report[-3000:]
        assert summary["trials"] == 3 and summary["trials_completed"] == 3 and summary["trials_errored"] == 0
        assert summary["tracking_complete"] is False and summary["registered_version"] is None
        command = summary["log_command"]
        assert shlex.split(command)[:10] == ["python", "-m", "platform.tune", "--dataset", "eurosat", "--data-root",
                                             str(small_eurosat_root.resolve()), "--resume", "--sweep-name", "outage"]
        assert "MLflow failed:" in report and command in report
        sweep_dir = tmp_path / "ray" / "outage"
        results_before = {p.parent.name: p.read_text() for p in sweep_dir.glob("*/result.json")}
        assert len(results_before) == 3

        server = _start_server(store, port)  # the same store, back again
        rc, report, logged = _tune(shlex.split(command)[3:] + ["--json"])
        assert rc == 0, report[-3000:]
        assert logged["tracking_complete"] is True and logged["trials_completed"] == 3
        assert logged["registered_version"] == 1 and logged["champion_version"] == 1
        assert logged["parent_run_id"] == summary["parent_run_id"]
        # Nothing was trained again: every trial's results are byte for byte those of the first run.
        assert {p.parent.name: p.read_text() for p in sweep_dir.glob("*/result.json")} == results_before

        client = MlflowClient(uri, registry_uri=uri)
        parent = client.get_run(summary["parent_run_id"])
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
        assert len(children) == 3 and len({c.data.tags["coop.trial_id"] for c in children}) == 3
        for child in children:
            assert child.info.status == "FINISHED"
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_acc")) == [1, 2]
            assert "test_acc" in child.data.metrics
            assert {a.path for a in client.list_artifacts(child.info.run_id, "prompts")} >= {
                "prompts/prompts.safetensors"}
        assert [int(v.version) for v in client.search_model_versions("name = 'coop-eurosat'")] == [1]
        # Running it once more changes nothing: no second version, the champion rule is not applied again.
        rc, _, again = _tune(shlex.split(command)[3:] + ["--json"])
        assert rc == 0 and again["registered_version"] == 1
        assert [int(v.version) for v in client.search_model_versions("name = 'coop-eurosat'")] == [1]
    finally:
        _stop(server)
