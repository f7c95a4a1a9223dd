"""``--resume``: a sweep whose driver is SIGKILLed, or interrupted with Ctrl-C (SIGINT), after its first finished
trial completes without re-running any trial, leaves no MLflow run RUNNING and registers exactly one version.

The CLI runs in a subprocess with its own local Ray. SIGKILL takes the whole process group (driver, Ray and its
workers: no clean shutdown at all); SIGINT goes to the group as a terminal's Ctrl-C does, and the driver ends the sweep
itself (exit 130, unfinished runs KILLED). Finished trials are read from Tune's experiment state, the file
``--resume`` restores from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.long]  # a driver killed and resumed, per trial path

REPO = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 3
EPOCHS = 2


def _trial_states(sweep_dir: Path) -> dict[str, dict]:
    """Trial id -> {"status", "logdir"} from Tune's newest experiment state file (empty until one is written)."""
    files = sorted(sweep_dir.glob("experiment_state-*.json"))  # named by session start time; mtimes are not ordered
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except ValueError:  # being rewritten
        return {}
    out = {}
    for trial_json, _ in data["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = {"status": trial["status"], "logdir": trial["relative_logdir"]}
    return out


def _result_rows(sweep_dir: Path, logdir: str) -> str:
    return (sweep_dir / logdir / "result.json").read_text()


def _epochs_reported(sweep_dir: Path, logdir: str) -> list[int]:
    rows = [json.loads(line) for line in _result_rows(sweep_dir, logdir).splitlines() if line.strip()]
    return [int(row["epoch"]) for row in rows if "epoch" in row]


def _interrupt_when(args: list[str], sweep_dir: Path, tmp_path: Path, sig: int, ready: Callable[[dict], bool]
                    ) -> tuple[subprocess.Popen, dict[str, dict], dict[str, str], str]:
    """Run the sweep ``args`` pausing 1 s after every epoch (a hook injected in the child), send ``sig`` to its
    process group once ``ready(trial states)`` holds, and wait for it: (process, the trials TERMINATED by then, the
    environment for the resumed run, the first run's log)."""
    slow = [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests/platform'); import faults; "
            "faults.tune_main_with_hooks()", json.dumps([{"pause": 1.0}]), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"  # write the experiment state often, so the signal finds it current
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(slow, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            states = _trial_states(sweep_dir)
            finished = {tid: s for tid, s in states.items() if s["status"] == "TERMINATED"}
            if ready(states):
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            # SIGKILL: the driver, its Ray cluster and every worker, no clean shutdown. SIGINT: Ctrl-C.
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()
    return proc, finished, env, (tmp_path / "first.log").read_text()


@pytest.mark.parametrize(("runner", "sig"), [("in-process", signal.SIGKILL), ("ray-train", signal.SIGKILL),
                                             ("in-process", signal.SIGINT)], ids=["in-process-SIGKILL",
                                                                                  "ray-train-SIGKILL",
                                                                                  "in-process-SIGINT"])
def test_resume_finishes_an_interrupted_sweep_without_rerunning_finished_trials(
    runner, sig, small_eurosat_root, feature_cache, tiny_vit_config, tmp_path
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    sweep_dir = storage / "interrupted"
    args = ["--dataset", "eurosat", "--data-root", str(small_eurosat_root),
            "--backbone", tiny_vit_config, "--pretrained", "none", "--shots", "1", "--epochs", str(EPOCHS),
            "--n-views", "1", "--batch-size", "8", "--max-test-items", "20", "--num-samples", str(NUM_SAMPLES),
            "--max-concurrent", "2", "--cache-dir", str(feature_cache), "--storage-path", str(storage),
            "--tracking-uri", uri, "--sweep-name", "interrupted", "--trial-runner", runner, "--json"]
    # The first run pauses after every epoch, so trials take seconds and the signal lands while later trials run;
    # the resumed run is the plain CLI.
    proc, finished, env, first_log = _interrupt_when(
        args, sweep_dir, tmp_path, sig, lambda states: any(s["status"] == "TERMINATED" for s in states.values()))
    assert finished, f"no trial finished before the deadline (rc {proc.returncode}):\n{first_log[-3000:]}"
    expected_rc = -signal.SIGKILL if sig == signal.SIGKILL else 130
    assert proc.returncode == expected_rc, f"rc {proc.returncode}, not interrupted as sent:\n{first_log[-3000:]}"
    assert len(finished) < NUM_SAMPLES
    rows_before = {tid: _result_rows(sweep_dir, s["logdir"]) for tid, s in finished.items()}
    epochs_before = {tid: _epochs_reported(sweep_dir, s["logdir"]) for tid, s in _trial_states(sweep_dir).items()
                     if tid not in finished and (sweep_dir / s["logdir"] / "result.json").exists()}
    parent_run_id = json.loads((sweep_dir / "coop_sweep.json").read_text())["parent_run_id"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if sig == signal.SIGINT:  # the interrupted driver closed every run itself: KILLED, or FINISHED for done trials
        assert "Finish the sweep with: python -m platform.tune --dataset eurosat --data-root " in first_log
        parent = client.get_run(parent_run_id)
        assert parent.info.status == "KILLED"
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        assert runs and "RUNNING" not in {r.info.status for r in runs}
        assert {r.data.tags["coop.trial_id"] for r in runs if r.info.status == "FINISHED"} >= set(finished)
        assert client.search_model_versions("name = 'coop-eurosat'") == []  # nothing registered mid-sweep

    resumed = subprocess.run([sys.executable, "-m", "platform.tune", *args, "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["parent_run_id"] == parent_run_id
    assert summary["trials"] == NUM_SAMPLES and summary["trials_completed"] == NUM_SAMPLES
    assert summary["trials_errored"] == 0 and summary["registered_version"] == 1
    assert summary["trial_runner"] == runner  # the resumed sweep keeps the path it started with

    states = _trial_states(sweep_dir)
    assert len(states) == NUM_SAMPLES and {s["status"] for s in states.values()} == {"TERMINATED"}
    for tid, rows in rows_before.items():
        assert _result_rows(sweep_dir, states[tid]["logdir"]) == rows, f"finished trial {tid} was run again"
    for tid, s in states.items():  # an interrupted trial continued from its checkpoint, not from the start
        epochs = _epochs_reported(sweep_dir, s["logdir"])  # (empty for a DDP trial whose run ended before the kill)
        assert all(1 <= e <= EPOCHS for e in epochs), (tid, epochs)
        before = epochs_before.get(tid, [])
        if before and epochs[:len(before)] == before:  # the resumed trial appended to its log
            after = epochs[len(before):]
            assert before == sorted(set(before)) and after == sorted(set(after)), (tid, epochs)
            # Only the last epoch reported before the interrupt may come again: Tune logs a result before it
            # registers the checkpoint that came with it, and a stop in between resumes the trial from the one
            # before. MLflow holds every epoch once whatever Tune's log repeats (checked below).
            assert not after or after[0] >= before[-1], (tid, before, after)
        else:  # a new log (a DDP trial's run restarted by Ray Train): no epoch twice
            assert epochs == sorted(set(epochs)), (tid, epochs)

    # The registry: one version for the sweep, the champion rule applied to it once.
    versions = client.search_model_versions("name = 'coop-eurosat'")
    assert [int(v.version) for v in versions] == [1] and versions[0].tags["champion_rule_applied"] == "true"
    assert versions[0].tags["sweep_run_id"] == parent_run_id
    assert int(client.get_model_version_by_alias("coop-eurosat", "champion").version) == 1

    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    assert sorted(c.data.tags["coop.trial_id"] for c in children) == sorted(states)  # one run per trial, no extras
    for child in children:
        assert child.info.status == "FINISHED"  # none left RUNNING or KILLED
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, len(steps) + 1)) and steps  # every epoch once
        if child.data.tags["coop.trial_id"] in finished:
            assert sorted(steps) == list(range(1, EPOCHS + 1))
            assert "test_acc" in child.data.metrics


PACKED_CONFIGS, PACKED_EPOCHS = 4, 4


def test_resume_finishes_a_killed_packed_sweep_continuing_each_member_from_its_checkpoint(
    small_eurosat_root, feature_cache, tiny_vit_config, tmp_path
):
    """Packs of 2 configurations, one pack at a time; the driver and its Ray are SIGKILLed once the first pack has
    finished and the second has checkpointed an epoch. ``--resume`` leaves the finished pack as it was, continues
    the second from its checkpoint (no epoch of it is reported twice), and ends with one FINISHED child run per
    configuration holding each of its epochs once, and one registered version."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    sweep_dir = storage / "packed"
    args = ["--dataset", "eurosat", "--data-root", str(small_eurosat_root),
            "--backbone", tiny_vit_config, "--pretrained", "none", "--shots", "1", "--epochs", str(PACKED_EPOCHS),
            "--n-views", "1", "--batch-size", "8", "--max-test-items", "20", "--num-samples", str(PACKED_CONFIGS),
            "--pack-size", "2", "--max-concurrent", "1", "--grace-period", str(PACKED_EPOCHS),
            "--cache-dir", str(feature_cache), "--storage-path", str(storage), "--tracking-uri", uri,
            "--sweep-name", "packed", "--json"]

    def second_pack_checkpointed(states: dict) -> bool:
        running = [s for s in states.values() if s["status"] == "RUNNING"]
        return (any(s["status"] == "TERMINATED" for s in states.values()) and bool(running)
                and bool(_epochs_reported(sweep_dir, running[0]["logdir"])))

    proc, finished, env, first_log = _interrupt_when(args, sweep_dir, tmp_path, signal.SIGKILL,
                                                     second_pack_checkpointed)
    assert finished and proc.returncode == -signal.SIGKILL, f"rc {proc.returncode}:\n{first_log[-3000:]}"
    rows_before = {tid: _result_rows(sweep_dir, s["logdir"]) for tid, s in finished.items()}

    resumed = subprocess.run([sys.executable, "-m", "platform.tune", *args, "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["pack_size"] == 2
    assert summary["trials"] == PACKED_CONFIGS and summary["trials_finished"] == PACKED_CONFIGS
    assert summary["trials_errored"] == 0 and summary["registered_version"] == 1

    states = _trial_states(sweep_dir)
    assert len(states) == PACKED_CONFIGS // 2 and {s["status"] for s in states.values()} == {"TERMINATED"}
    for tid, rows in rows_before.items():
        assert _result_rows(sweep_dir, states[tid]["logdir"]) == rows, f"finished pack {tid} was run again"
    for tid, s in states.items():  # the killed pack went on from its checkpoint: no pack epoch reported twice
        epochs = _epochs_reported(sweep_dir, s["logdir"])
        assert epochs == sorted(set(epochs)) and epochs[-1] == PACKED_EPOCHS, (tid, epochs)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    members = sorted(f"{tid}-m{j}" for tid in states for j in range(2))
    assert sorted(c.data.tags["coop.trial_id"] for c in children) == members  # one run per configuration
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, PACKED_EPOCHS + 1)), (child.data.tags["coop.trial_id"], steps)
        assert "test_acc" in child.data.metrics
    versions = client.search_model_versions("name = 'coop-eurosat'")
    assert [int(v.version) for v in versions] == [1]
