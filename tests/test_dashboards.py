"""The dashboards read a sweep's parent and child runs from MLflow and draw what they hold (a synthetic sweep here;
tests/platform/test_sweep.py checks the dashboards of real sweeps)."""

from __future__ import annotations

import json

import pytest

mlflow = pytest.importorskip("mlflow")

from dashboards.__main__ import main  # noqa: E402
from dashboards.report import build_dashboards  # noqa: E402
from dashboards.sweep import find_sweep, load_sweep  # noqa: E402

SPECS = [  # name, n_ctx, position, lr, val curve, stopped early
    ("t-good", "16", "end", 0.002, [40.0, 60.0, 75.0], False),
    ("t-mid", "8", "end", 0.004, [35.0, 50.0, 65.0], False),
    ("t-bad", "4", "front", 0.02, [30.0], True),
]


@pytest.fixture()
def sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("coop-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="sweep", tags={"coop.sweep": "s1"}).info.run_id
    space = {"prompt.n_ctx": "Choice", "prompt.class_token_position": "Choice", "train.lr": "LogUniform"}
    for key, value in {"dataset": "eurosat", "sweep.space": json.dumps(space), "sweep.grid": "-",
                       "train.epochs": "3"}.items():
        client.log_param(parent, key, value)
    for name, n_ctx, pos, lr, curve, stopped in SPECS:
        tags = {"mlflow.parentRunId": parent, "coop.trial_id": name, "coop.stopped_early": str(stopped).lower()}
        run = client.create_run(exp, run_name=name, tags=tags).info.run_id
        for key, value in {"prompt.n_ctx": n_ctx, "prompt.class_token_position": pos, "train.lr": lr,
                           "train.shots": "2"}.items():
            client.log_param(run, key, value)
        for step, value in enumerate(curve, start=1):
            client.log_metric(run, "val_acc", value, step=step)
        if not stopped:
            client.log_metric(run, "test_acc", curve[-1] - 1.0)
        client.set_terminated(run)
    return uri, client, parent


def _png_is_drawn(path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return colours is not None and len(colours) > 20  # more than a blank canvas with a frame


def test_dashboards_draw_the_sweep_and_log_under_dashboards(sweep, tmp_path):
    uri, client, parent = sweep
    result = build_dashboards(client, parent, tmp_path / "out", log=True)
    files, drawn, skipped = result["files"], result["drawn"], result["skipped"]
    assert drawn["val_curves"] == {name: list(enumerate(curve, start=1)) for name, *_, curve, _ in SPECS}
    assert set(drawn["param_importances"]) == {"prompt.n_ctx", "prompt.class_token_position", "train.lr"}
    assert sum(drawn["param_importances"].values()) == pytest.approx(1.0)
    rows = {r["trial_id"]: r for r in drawn["parallel_coordinates"]}
    assert rows["t-bad"]["val_acc"] == 30.0 and rows["t-good"]["prompt.n_ctx"] == 16
    assert "acc_vs_shots" in skipped and "nearest_words" in skipped  # one shot count; no trial logged its words
    for key in ("val_curves", "param_importances", "parallel_png", "dimensions"):
        assert _png_is_drawn(files[key]), key
    html = open(files["parallel_html"]).read()
    assert "Plotly.newPlot" in html and "t-good" not in html and "75" in html  # self-contained, with the values
    summary = open(files["summary"]).read().splitlines()
    assert summary[2].startswith("| t-good | 75.00 | 74.00 | 3 |") and summary[4].startswith("| t-bad | 30.00 |")
    logged = {a.path for a in client.list_artifacts(parent, "dashboards")}
    assert logged == {f"dashboards/{name}" for name in ("val_curves.png", "param_importances.png",
                                                         "parallel_coordinates.html", "parallel_coordinates.png",
                                                         "dimensions.png", "summary.md")}
    assert load_sweep(client, parent).best_trial().trial_id == "t-good"  # no tag yet: best finished by val


def test_cli_finds_a_sweep_by_name_and_fails_in_one_line(sweep, tmp_path, capsys):
    uri, _, parent = sweep
    assert find_sweep(mlflow.tracking.MlflowClient(uri), "s1") == parent
    assert main(["--tracking-uri", uri, "--sweep-name", "s1", "--out", str(tmp_path / "r"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parent_run_id"] == parent and "val_curves" in out["files"]
    assert main(["--tracking-uri", uri, "--parent-run-id", "0" * 32, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["--tracking-uri", uri, "--sweep-name", "nope", "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err == "error: no sweep 'nope' in this store\n"
