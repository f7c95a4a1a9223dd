"""The sweep report reads a parent run's children from MLflow and draws their curves and dimensions."""

from __future__ import annotations

import json

import pytest

mlflow = pytest.importorskip("mlflow")

from dashboards.report import build_report, load_trials, main  # noqa: E402


@pytest.fixture()
def sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("coop-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="sweep").info.run_id
    specs = [("t-good", "16", "end", 0.002, [40.0, 60.0, 75.0]), ("t-bad", "4", "front", 0.02, [30.0, 35.0])]
    for name, n_ctx, pos, lr, curve in specs:
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
        for key, value in {"prompt.n_ctx": n_ctx, "prompt.class_token_position": pos, "train.lr": lr}.items():
            client.log_param(run, key, value)
        for step, value in enumerate(curve, start=1):
            client.log_metric(run, "val_acc", value, step=step)
        client.log_metric(run, "test_acc", curve[-1] - 1.0)
        client.set_terminated(run)
    return uri, client, parent


def test_report_files_and_ranking(sweep, tmp_path):
    uri, client, parent = sweep
    trials = load_trials(client, parent)
    assert sorted(t.name for t in trials) == ["t-bad", "t-good"]
    assert {t.name: len(t.val_curve) for t in trials} == {"t-good": 3, "t-bad": 2}
    files = build_report(client, parent, tmp_path / "report", log=True)
    for key in ("curves", "dimensions"):
        with open(files[key], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "report" / "summary.md").read_text().splitlines()
    assert summary[2].startswith("| t-good | 75.00 | 74.00 | 3 |")  # best val first, test shown beside it
    assert summary[3].startswith("| t-bad | 35.00 |")
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/curves.png", "report/dimensions.png", "report/summary.md"}


def test_cli_json_and_bad_run(sweep, tmp_path, capsys):
    uri, _, parent = sweep
    assert main(["--tracking-uri", uri, "--parent-run-id", parent, "--out", str(tmp_path / "r"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"curves", "dimensions", "summary"}
    assert main(["--tracking-uri", uri, "--parent-run-id", "0" * 32, "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err
