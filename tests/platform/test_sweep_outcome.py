"""The sweep engine's data, without Ray: the state file ``--resume`` reads (``SweepState``), and how a CLI presents a
``SweepOutcome`` (``platform.sweep.flags.present``): a refused input, an interrupted sweep, a finished one."""

from __future__ import annotations

import json
from platform.run_spec import RunSpec
from platform.sweep.flags import present
from platform.sweep.outcome import SweepOutcome
from platform.sweep.plan import SweepPlan
from platform.sweep.report import JSON_KEYS
from platform.sweep.state import SWEEP_STATE_FILE, SweepState, read_sweep_state, write_sweep_state

import pytest


def _state(**overrides) -> SweepState:
    spec = RunSpec(dataset="eurosat", data_root="/data")
    fields = dict(dataset="eurosat", base_spec=spec.to_dict(), parent_run_id="abc", tracking_uri="sqlite:///m.db",
                  experiment="coop-eurosat", experiment_id="1", started_at=1.5, num_samples=2, search_seed=7,
                  epochs=10, trial_runner="in-process", gpus_per_trial=0.0, max_failures=2,
                  grid={"prompt.n_ctx": [4, 8, 16]}, kind="study", entry_point="platform.study",
                  resume_flags=("--protocol", "fewshot"))
    return SweepState(**(fields | overrides))


def test_the_state_file_round_trips_and_counts_its_trials(tmp_path):
    state = _state()
    write_sweep_state(str(tmp_path), state)
    assert read_sweep_state(str(tmp_path)) == state
    assert state.n_trials == 2 * 3 and state.spec == RunSpec(dataset="eurosat", data_root="/data")
    assert _state(grid={}).n_trials == 2  # a search: its samples
    on_disk = json.loads((tmp_path / SWEEP_STATE_FILE).read_text())
    assert on_disk["parent_run_id"] == "abc" and on_disk["resume_flags"] == ["--protocol", "fewshot"]  # plain JSON


def test_an_older_state_file_takes_the_defaults_and_a_foreign_one_is_refused(tmp_path):
    old = _state().to_dict()
    for key in ("kind", "entry_point", "early_stopping", "register", "resume_flags", "runs_url"):
        del old[key]  # written before these existed
    old["some_future_key"] = 1
    (tmp_path / SWEEP_STATE_FILE).write_text(json.dumps(old))
    state = read_sweep_state(str(tmp_path))
    assert (state.kind, state.entry_point, state.early_stopping, state.register, state.resume_flags) == (
        "sweep", "platform.tune", True, True, ())
    assert read_sweep_state(str(tmp_path / "nowhere")) is None
    (tmp_path / SWEEP_STATE_FILE).write_text(json.dumps({"dataset": "eurosat"}))
    with pytest.raises(ValueError, match=r"^--resume: .*coop_sweep.json cannot be read as a sweep's state \(not a "):
        read_sweep_state(str(tmp_path))


def test_a_refused_sweep_prints_one_error_line_and_nothing_on_stdout(capsys):
    assert present(SweepOutcome(status=2, error="--grid train.shots: 'x' is not a valid int"), json_output=True) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --grid train.shots: 'x' is not a valid int\n"


def test_an_interrupted_sweep_prints_how_to_finish_it(capsys):
    outcome = SweepOutcome(status=130, summary={"trials": 3}, notice="interrupted: ... Finish the sweep with: cmd")
    assert present(outcome, json_output=True) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == "interrupted: ... Finish the sweep with: cmd\n"


def test_a_finished_sweep_prints_its_report_the_plans_and_the_json_line_last(capsys):
    summary = {k: None for k in JSON_KEYS} | {
        "sweep_name": "s", "dataset": "eurosat", "trials": 0, "trials_completed": 0, "trials_finished": 0,
        "trials_early_stopped": 0, "trials_errored": 0, "epochs": 1, "parent_run_id": "abc", "experiment": "e",
        "ui_command": "mlflow ui", "sweep_dir": "/tmp/s", "resume_command": "python -m platform.tune --resume",
        "wall_s": 3.0, "study": {"table": 1}}
    plan = SweepPlan(report=lambda s: f"PLAN REPORT {s['sweep_name']}", json_keys=("study",))
    assert present(SweepOutcome(status=1, summary=summary), plan, json_output=True) == 1
    out, _ = capsys.readouterr()
    lines = out.strip().splitlines()
    assert "Sweep s on eurosat" in out and "resume             python -m platform.tune --resume" in out
    assert "PLAN REPORT s" in out and out.index("PLAN REPORT") > out.index("Sweep s on eurosat")
    assert json.loads(lines[-1])["study"] == {"table": 1} and json.loads(lines[-1])["sweep_name"] == "s"
    # MLflow failed: the plan's report (which reads what MLflow was to hold) is left out, the report says why
    present(SweepOutcome(status=1, summary=summary | {"tracking_error": "gone", "log_command": "cmd"}), plan)
    assert "PLAN REPORT" not in capsys.readouterr().out


def test_closing_a_resumed_sweep_retires_the_run_of_a_trial_tune_lost_and_keeps_the_others(tmp_path):
    """A driver killed after a trial's run was opened but before Tune saved the trial: the resumed sweep's trials do
    not include it. Closing the sweep ends that run KILLED, tags why and deletes it (one run per trial remains); the
    runs of the sweep's own trials -- an errored one included, whose result has no trial id in its metrics -- stay."""
    from platform import tracking
    from platform.sweep.outcome import trial_rows
    from platform.sweep.parent_run import close_unclosed_runs
    from platform.sweep.trial_runs import TrialRuns
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.create_run("coop-eurosat", run_name="sweep", tracking_uri=uri)
    runs = TrialRuns(parent_run_id=parent, experiment="coop-eurosat", tracking_uri=uri,
                     base_spec=RunSpec(dataset="eurosat", data_root="/data").to_dict(), storage_path=str(tmp_path),
                     epochs=2, sweep_name="sweep")
    config = {"prompt.n_ctx": 4}
    for trial_id in ("a1b2c_00000", "a1b2c_00001", "lost0001"):
        runs.set_running(trial_id, config)
    runs.mark_failed("a1b2c_00000", config, "done elsewhere")  # already ended: left as it is

    # A ResultGrid as Ray builds it: results in the order of its trials; the errored trial never reported.
    results = [SimpleNamespace(metrics={"trial_id": "a1b2c_00000", "failure": "done elsewhere", "epoch": 1},
                               error=None, config=config, path=str(tmp_path / "in_process_trial_a1b2c_00000_0_x"),
                               checkpoint=None),
               SimpleNamespace(metrics={}, error=RuntimeError("worker died"), config=config,
                               path=str(tmp_path / "in_process_trial_a1b2c_00001_1_x"), checkpoint=None)]

    class Grid(list):
        _experiment_analysis = SimpleNamespace(trials=[SimpleNamespace(trial_id="a1b2c_00000"),
                                                       SimpleNamespace(trial_id="a1b2c_00001")])

    rows = trial_rows(Grid(results), epochs=2)
    assert [r["trial_id"] for r in rows] == ["a1b2c_00000", "a1b2c_00001"]
    callback = SimpleNamespace(runs=runs, mark_failed=runs.mark_failed,
                               finish_from_result=lambda *a: pytest.fail("nothing here finished unrecorded"))
    close_unclosed_runs(callback, rows)

    client = MlflowClient(uri)
    active = {r.data.tags["coop.trial_id"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert sorted(active) == ["a1b2c_00000", "a1b2c_00001"]
    assert active["a1b2c_00001"].info.status == "FAILED"
    assert active["a1b2c_00001"].data.tags[tracking.FAILURE_TAG] == "worker died"
    lost = runs.child_runs().get("lost0001") or next(
        r for r in client.search_runs([client.get_run(parent).info.experiment_id], run_view_type=3)
        if r.data.tags.get("coop.trial_id") == "lost0001")
    assert lost.info.status == "KILLED" and lost.info.lifecycle_stage == "deleted"
    assert "lost when the driver was killed" in lost.data.tags[tracking.LOST_TAG]
