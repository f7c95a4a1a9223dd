"""A sweep end to end: Ray Tune + Optuna + ASHA over Ray Train trials, MLflow parent/child runs, the prompt registry's
champion rule, and the registered pyfunc classifying real EuroSAT images in a fresh process.

Two sweeps run in this process on the shared local Ray (Ray Train start-up dominates on 2 cores, so they are small):
a real one (4 trials, 2 epochs) and a deliberately worse one (1 epoch at warm-up learning rate, random context, so
nothing is learned). The backbone is the tiny ViT whose image projection is fitted by ridge regression to the text
features of EuroSAT's zero-shot prompts (:func:`aligned_tiny_checkpoint`): with random weights every configuration
sits at chance and "worse" could not be told from "better".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from platform.artifacts import REGISTRY_METRIC, REGISTRY_SET_KEY, WEIGHTS_DIGEST_KEY
from platform.registry import CHAMPION, scoped_champion_alias
from platform.tracking import EARLY_STOPPED_TAG, TRIAL_TAG
from platform.tune import main

import pytest
from cli_runs import aligned_sweep, run_cli
from cli_runs import child_runs as _children
from cli_runs import mlflow_client as _client
from numerics import ONE_PASS, assert_probabilities, assert_reordered, assert_reordered_scalar
from servers import running_server

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SEARCHED = ("prompt.n_ctx", "prompt.ctx_init", "prompt.class_token_position", "prompt.csc", "train.lr")


def _sweep(argv: list[str]) -> dict:
    return run_cli(main, argv)


@pytest.fixture(scope="module")
def sweeps(ray_session, small_eurosat_root, shared_data, feature_cache, tiny_vit_config, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sweep")
    checkpoint, uri, common = aligned_sweep(tmp, data_root=small_eurosat_root, shared_data=shared_data,
                                            feature_cache=feature_cache, tiny_vit_config=tiny_vit_config)
    common = [*common, "--batch-size", "8"]
    good = _sweep([*common, "--epochs", "2", "--warmup-epochs", "0", "--num-samples", "4", "--max-concurrent", "2",
                   "--sweep-name", "good"])
    worse = _sweep([*common, "--epochs", "1", "--num-samples", "2", "--fixed", "prompt.ctx_init", "train.lr",
                    "--ctx-init", "", "--lr", "1e-5", "--sweep-name", "worse"])
    # A study of two shot counts, in its own store (its registration must not touch the champion tests above).
    shots_uri = f"sqlite:///{tmp / 'shots.db'}"
    shots_argv = [shots_uri if a == uri else a for a in common]
    shots = _sweep([*shots_argv, "--epochs", "1", "--grid", "train.shots=1,2", "--max-concurrent", "2",
                    "--sweep-name", "shots"])
    return {"uri": uri, "tmp": tmp, "good": good, "worse": worse, "checkpoint": checkpoint, "shots": shots,
            "shots_uri": shots_uri}


def test_sweep_runs_every_trial_and_reports_the_best_by_validation(sweeps):
    s = sweeps["good"]["summary"]
    assert s["trials"] == 4 and s["trials_completed"] == 4 and s["trials_errored"] == 0
    assert s["trials_finished"] + s["trials_early_stopped"] == 4 and s["trials_finished"] >= 1
    assert set(s["best_config"]) == set(SEARCHED)
    # The reported accuracies are the best trial's, as its MLflow child run holds them, and shares of the 40 test
    # images (--max-test-items).
    best = next(c for c in _children(_client(sweeps["uri"]), s["parent_run_id"])
                if c.data.tags[TRIAL_TAG] == s["best_trial_id"])
    print(f"\nbest trial: val {s['val_acc']} %, test {s['test_acc']} %, zero-shot {s['zeroshot_test_acc']} %")
    for key in ("val_acc", "test_acc", "zeroshot_test_acc"):
        assert s[key] == pytest.approx(best.data.metrics[key]), key
    for key in ("test_acc", "zeroshot_test_acc"):
        correct = s[key] * 40 / 100
        assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= 40, (key, s[key])
    report = sweeps["good"]["report"]
    assert "best (by val acc)" in report and "zero-shot" in report
    assert "mlflow ui --host 127.0.0.1 --backend-store-uri" in report
    assert s["parent_run_id"] in report


def test_parent_and_child_runs_hold_params_metrics_and_artifacts(sweeps):
    s = sweeps["good"]["summary"]
    client = _client(sweeps["uri"])
    parent = client.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.num_samples"] == "4"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(s["val_acc"])
    children = _children(client, s["parent_run_id"])
    assert len(children) == 4 and len({c.data.tags[TRIAL_TAG] for c in children}) == 4
    best_val = {}
    for child in children:
        assert child.info.status == "FINISHED"
        params = child.data.params
        for key in (*SEARCHED, "model.backbone", "model.pretrained", "shots", "seed", "train.epochs"):
            assert key in params, key
        words = params["prompt.ctx_init"].split()
        expected_n_ctx = {"": int(params["prompt.n_ctx"]), "a photo of a": 4, "a centered satellite photo of": 5}
        assert int(params["prompt.n_ctx_effective"]) == expected_n_ctx[" ".join(words)]
        history = client.get_metric_history(child.info.run_id, "val_acc")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1)) and steps, steps  # one value per epoch, step = epoch
        assert {m.step for m in client.get_metric_history(child.info.run_id, "lr")} == set(steps)
        assert {m.step for m in client.get_metric_history(child.info.run_id, "train_loss")} == set(steps)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "history.json"} <= artifacts
        if child.data.tags[EARLY_STOPPED_TAG] == "false":
            assert steps == [1, 2]
            assert "test_acc" in child.data.metrics and "zeroshot_test_acc" in child.data.metrics
            assert {"nearest_words.txt", "prompts"} <= artifacts
            prompts = {a.path for a in client.list_artifacts(child.info.run_id, "prompts")}
            assert "prompts/prompts.safetensors" in prompts
            best_val[child.data.tags[TRIAL_TAG]] = child.data.metrics["val_acc"]
        else:
            assert steps == [1] and "test_acc" not in child.data.metrics
    assert max(best_val.values()) == pytest.approx(s["val_acc"])
    assert best_val[s["best_trial_id"]] == pytest.approx(s["val_acc"])


def test_first_sweep_registers_version_1_as_champion(sweeps, tiny_vit_config):
    s = sweeps["good"]["summary"]
    assert s["registered_model"] == "coop-eurosat" and s["registered_version"] == 1 and s["champion_version"] == 1
    client = _client(sweeps["uri"])
    version = client.get_model_version_by_alias("coop-eurosat", CHAMPION)
    assert int(version.version) == 1
    tags = version.tags
    assert tags["backbone"] == str(Path(tiny_vit_config).resolve()) and tags["weights"] == str(sweeps["checkpoint"])
    assert tags["shots"] == "2" and tags["seed"] == "1" and tags["dataset"] == "eurosat"
    assert len(json.loads(tags["classnames"])) == 10 and "Annual Crop Land" in json.loads(tags["classnames"])
    best_position = s["best_config"]["prompt.class_token_position"]
    assert json.loads(tags["config"])["prompt"]["class_token_position"] == best_position
    assert float(tags["val_acc"]) == pytest.approx(s["val_acc"], abs=1e-3)
    assert tags["trial_id"] == s["best_trial_id"] and tags["sweep_run_id"] == s["parent_run_id"]
    scoped = scoped_champion_alias(str(Path(tiny_vit_config).resolve()), 2)
    assert scoped == "champion-tiny-vit-2shot"
    assert int(client.get_model_version_by_alias("coop-eurosat", scoped).version) == 1


def test_worse_sweep_adds_version_2_and_leaves_the_champion(sweeps):
    good, worse = sweeps["good"]["summary"], sweeps["worse"]["summary"]
    assert worse["trials"] == 2 and worse["trials_completed"] == 2
    assert set(worse["best_config"]) == set(SEARCHED) - {"prompt.ctx_init", "train.lr"}  # --fixed: not searched
    assert worse["val_acc"] < good["val_acc"], (worse["val_acc"], good["val_acc"])  # really worse
    assert worse["registered_version"] == 2 and worse["champion_version"] == 1
    client = _client(sweeps["uri"])
    assert int(client.get_model_version_by_alias("coop-eurosat", CHAMPION).version) == 1
    assert client.get_model_version("coop-eurosat", "2").tags["trial_id"] == worse["best_trial_id"]
    # Judged on the same images with the same CLIP: the two sweeps' versions carry the same digests of both.
    v1, v2 = (client.get_model_version("coop-eurosat", v).tags for v in ("1", "2"))
    for key in (WEIGHTS_DIGEST_KEY, REGISTRY_SET_KEY):
        assert len(v1[key]) == 64 and v1[key] == v2[key], key
    assert float(v2[REGISTRY_METRIC]) <= float(v1[REGISTRY_METRIC])
    assert re.search(r"registry acc [\d.]+ does not beat @champion v1's [\d.]+ on the same images",
                     sweeps["worse"]["report"])
    worse_children = _children(client, worse["parent_run_id"])
    assert {c.data.params["prompt.ctx_init"] for c in worse_children} == {""}
    assert {float(c.data.params["train.lr"]) for c in worse_children} == {1e-5}


@pytest.mark.numeric
def test_champion_pyfunc_classifies_real_images_in_a_fresh_process(sweeps, shared_data, tmp_path):
    from coop_core.datasets import load_dataset

    splits = load_dataset("eurosat", shared_data)
    paths = [str(splits.image_dir / it.path) for it in splits.test[::1600]]  # one image of several classes
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model('models:/coop-eurosat@champion')\n"
        "paths = json.loads(sys.argv[2])\n"
        "by_path = model.predict(pd.DataFrame({'image': paths}))\n"
        "by_bytes = model.predict(pd.DataFrame({'image': [open(p, 'rb').read() for p in paths]}))\n"
        "import platform\n"
        "print(json.dumps({'by_path': by_path.to_dict(orient='list'), 'by_bytes': by_bytes.to_dict(orient='list'),\n"
        "                  'platform': platform.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-c", script, sweeps["uri"], json.dumps(paths)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["platform"].startswith(str(REPO))  # the stdlib platform: our package was never needed
    pred = out["by_path"]
    classes = list(splits.classnames)
    assert list(pred) == ["class_name", "probability", *[f"prob_{c}" for c in classes]]
    assert len(pred["class_name"]) == len(paths) and set(pred["class_name"]) <= set(classes)
    for i in range(len(paths)):
        probs = [pred[f"prob_{c}"][i] for c in classes]
        assert_probabilities(probs)
        assert pred["probability"][i] == max(probs)  # the same float, picked
        assert pred["class_name"][i] == classes[probs.index(max(probs))]
    assert out["by_bytes"]["class_name"] == pred["class_name"]
    assert_reordered(out["by_bytes"]["probability"], pred["probability"], ONE_PASS, "images sent as bytes vs paths")


def test_set_champion_command_promotes_a_version_by_hand(sweeps, capsys):
    from platform import registry

    client = _client(sweeps["uri"])
    assert int(client.get_model_version_by_alias("coop-eurosat", CHAMPION).version) == 1
    rc = registry.main(["set-champion", "--dataset", "eurosat", "--version", "2", "--tracking-uri", sweeps["uri"]])
    assert rc == 0 and capsys.readouterr().out.strip() == "coop-eurosat@champion -> v2"
    assert int(client.get_model_version_by_alias("coop-eurosat", CHAMPION).version) == 2
    rc = registry.main(["set-champion", "--dataset", "eurosat", "--version", "9", "--tracking-uri", sweeps["uri"]])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert int(client.get_model_version_by_alias("coop-eurosat", CHAMPION).version) == 2  # unchanged
    registry.main(["set-champion", "--dataset", "eurosat", "--version", "1", "--tracking-uri", sweeps["uri"]])


def test_mlflow_ui_metadata_opens_on_runs_with_accuracy_columns_and_links(sweeps):
    from platform import tracking

    s = sweeps["good"]["summary"]
    client = _client(sweeps["uri"])
    parent = client.get_run(s["parent_run_id"])
    exp_id = parent.info.experiment_id
    experiment = client.get_experiment(exp_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert "child run per trial" in experiment.tags[tracking.NOTE_TAG]
    # The printed link opens the runs table (not the GenAI overview) with the sweep's saved view.
    assert s["runs_url"] == (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
                             "&viewStateShareKey=good")
    view = json.loads(experiment.tags[tracking.SHARED_VIEW_PREFIX + "good"])
    assert view["selectedColumns"][:3] == ["metrics.`val_acc`", "metrics.`test_acc`", "metrics.`zeroshot_test_acc`"]
    assert {f"params.`{k}`" for k in SEARCHED} <= set(view["selectedColumns"])
    # The sweep's own row shows the best trial's accuracies in the same columns as its trials.
    assert parent.data.metrics["val_acc"] == pytest.approx(s["val_acc"])
    assert parent.data.metrics["zeroshot_test_acc"] == pytest.approx(s["zeroshot_test_acc"])
    note = parent.data.tags[tracking.NOTE_TAG]
    assert note.startswith("**Sweep `good`**") and "viewStateShareKey=good" in note
    assert f"python -m dashboards --parent-run-id {s['parent_run_id']}" in note
    for child in _children(client, s["parent_run_id"]):
        run_id, tags = child.info.run_id, child.data.tags
        note = tags[tracking.NOTE_TAG]
        assert note.startswith(f"**Trial `{tags[TRIAL_TAG]}`** of sweep [good](#/experiments/{exp_id}/runs/")
        assert f"(#/experiments/{exp_id}/runs/{run_id}/artifacts/config.json?workflowType=machine_learning)" in note
        checkpoint = Path(tags[tracking.CHECKPOINT_TAG])
        assert f"Ray checkpoint: `{checkpoint}`" in note
        assert json.loads((checkpoint / "config.json").read_text())["dataset"] == "eurosat"  # the link is real
        if tags[EARLY_STOPPED_TAG] == "true":
            assert "stopped early by ASHA after epoch 1 of 2" in note
        else:
            assert f"ran all 2 epochs: val_acc {child.data.metrics['val_acc']:.2f} %" in note


def test_registered_version_says_what_it_is_and_how_to_serve_it(sweeps):
    s = sweeps["good"]["summary"]
    client = _client(sweeps["uri"])
    version = client.get_model_version("coop-eurosat", "1")
    text = version.description
    assert "on eurosat (10 classes), 2-shot, seed 1" in text
    assert f"validation {s['val_acc']:.2f} %" in text and f"test {s['test_acc']:.2f} %" in text
    assert f"zero-shot CLIP on test {s['zeroshot_test_acc']:.2f} %" in text
    assert "sweep `good`" in text and s["best_trial_id"] in text
    assert "mlflow models serve -m models:/coop-eurosat@champion --env-manager local --host 127.0.0.1" in text
    assert "champion" in client.get_registered_model("coop-eurosat").description


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def served_champion(sweeps, tmp_path_factory):
    """``mlflow models serve -m models:/coop-eurosat@champion`` on 127.0.0.1, started as the README says (the venv's
    bin/ on PATH, where ``uvicorn`` lives); stopped after the tests."""
    from platform.registry import serve_command

    port = _free_port()
    argv = serve_command("coop-eurosat", port=port).split()
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MLFLOW_TRACKING_URI": sweeps["uri"], "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with running_server([os.path.join(bin_dir, argv[0]), *argv[1:]], cwd=log.parent, env=env, log=log,
                        health_url=f"{url}/ping", what="mlflow models serve", timeout_s=240):
        yield url


def test_registered_model_has_an_image_in_probabilities_out_signature(sweeps):
    import mlflow

    mlflow.set_tracking_uri(sweeps["uri"])
    info = mlflow.models.get_model_info("models:/coop-eurosat@champion")
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.inputs.input_types()[0].name == "string"
    from coop_core.datasets.eurosat import EUROSAT_CLASSNAMES

    classes = list(EUROSAT_CLASSNAMES.values())
    assert info.signature.outputs.input_names() == ["class_name", "probability", *[f"prob_{c}" for c in classes]]


@pytest.mark.numeric
def test_rest_server_classifies_real_eurosat_images_sent_as_base64(served_champion, shared_data):
    import base64

    from coop_core.datasets import load_dataset

    splits = load_dataset("eurosat", shared_data)
    items = splits.test[::900][:4]  # real test images of several classes
    b64 = [base64.b64encode((splits.image_dir / it.path).read_bytes()).decode() for it in items]
    classes = list(splits.classnames)

    status, one = _post(f"{served_champion}/invocations",
                        {"dataframe_split": {"columns": ["image"], "data": [[b64[0]]]}})
    assert status == 200, one
    status, batch = _post(f"{served_champion}/invocations",
                          {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}})
    assert status == 200, batch
    rows = batch["predictions"]
    assert len(rows) == len(items) and len(one["predictions"]) == 1
    for row in rows:
        probs = [row[f"prob_{c}"] for c in classes]
        assert_probabilities(probs)
        assert row["class_name"] == classes[probs.index(max(probs))] and row["probability"] == max(probs)
    # One image alone vs the same image in a batch: other GEMM shapes, one forward pass in another order.
    assert_reordered_scalar(one["predictions"][0]["probability"], rows[0]["probability"], ONE_PASS, "single vs batch")
    assert one["predictions"][0]["class_name"] == rows[0]["class_name"]


def test_rest_server_answers_a_malformed_image_with_400_and_one_line(served_champion, shared_data):
    import base64

    from coop_core.datasets import load_dataset

    splits = load_dataset("eurosat", shared_data)
    good = base64.b64encode((splits.image_dir / splits.test[0].path).read_bytes()).decode()
    bad = base64.b64encode(b"this is not an image").decode()
    status, body = _post(f"{served_champion}/invocations",
                         {"dataframe_split": {"columns": ["image"], "data": [[good], [bad]]}})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    # MLflow's scoring server puts "Failed to predict data '<the request>'." before the model's message; ours is
    # its last line, one line that names the image.
    last = body["message"].splitlines()[-1]
    assert last == ("Error: image 2 of 2 is not readable: its bytes are not an image format PIL reads "
                    "(JPEG, PNG, TIFF, ...)"), body["message"]
    assert "Traceback" not in json.dumps(body)


def _png_is_drawn(path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return colours is not None and len(colours) > 20  # more than a blank canvas with a frame


DASHBOARD_FILES = {"val_curves.png", "param_importances.png", "parallel_coordinates.html", "parallel_coordinates.png",
                   "nearest_words.png", "dimensions.png", "summary.md"}


def test_every_sweep_logs_dashboards_that_show_its_trials(sweeps, tmp_path):
    from coop_core.interpret import parse_nearest_words_table
    from dashboards.report import build_dashboards

    s = sweeps["good"]["summary"]
    client = _client(sweeps["uri"])
    logged = {a.path.split("/", 1)[1] for a in client.list_artifacts(s["parent_run_id"], "dashboards")}
    assert logged == DASHBOARD_FILES  # one shot count: no acc-vs-shots
    assert {Path(p).name for p in s["dashboards"].values()} == DASHBOARD_FILES
    assert all(Path(p).is_file() for p in s["dashboards"].values())
    # Drawn again on demand, the pictures hold the trials' real values.
    result = build_dashboards(client, s["parent_run_id"], tmp_path)
    drawn = result["drawn"]
    children = {c.data.tags[TRIAL_TAG]: c for c in _children(client, s["parent_run_id"])}
    assert set(drawn["val_curves"]) == set(children)
    for trial_id, points in drawn["val_curves"].items():
        history = client.get_metric_history(children[trial_id].info.run_id, "val_acc")
        assert points == sorted((m.step, m.value) for m in history) and points
    rows = {r["trial_id"]: r for r in drawn["parallel_coordinates"]}
    assert set(rows) == set(children)
    for trial_id, row in rows.items():
        assert row["val_acc"] == drawn["val_curves"][trial_id][-1][1]
        assert row["prompt.n_ctx"] == int(children[trial_id].data.params["prompt.n_ctx"])
    assert set(drawn["param_importances"]) <= set(SEARCHED) and drawn["param_importances"]
    best = children[s["best_trial_id"]]
    words_file = client.download_artifacts(best.info.run_id, "nearest_words.txt", str(tmp_path / "w"))
    table = parse_nearest_words_table(Path(words_file).read_text())
    assert drawn["nearest_words"] == {k: [[w for w, _ in r] for r in v] for k, v in table.items()}
    expected_sets = 10 if best.data.params["prompt.csc"] == "True" else 1
    assert len(drawn["nearest_words"]) == expected_sets
    for name in ("val_curves", "param_importances", "parallel_png", "nearest_words", "dimensions"):
        assert _png_is_drawn(result["files"][name]), name
    assert "Plotly.newPlot" in Path(result["files"]["parallel_html"]).read_text()


def test_a_study_of_several_shot_counts_draws_accuracy_vs_shots(sweeps):
    s = sweeps["shots"]["summary"]
    assert s["trials"] == 2 and s["trials_finished"] == 2
    client = _client(sweeps["shots_uri"])
    logged = {a.path.split("/", 1)[1] for a in client.list_artifacts(s["parent_run_id"], "dashboards")}
    assert "acc_vs_shots.png" in logged
    from dashboards.shots import plot_acc_vs_shots
    from dashboards.sweep import load_sweep

    sweep = load_sweep(client, s["parent_run_id"])
    drawn = plot_acc_vs_shots(sweep.trials, Path(s["dashboards"]["acc_vs_shots"]).with_name("again.png"))
    by_shots = {int(t.params["train.shots"]): t.metrics for t in sweep.trials}
    assert drawn["coop"] == {k: m["test_acc"] for k, m in sorted(by_shots.items())} and set(drawn["coop"]) == {1, 2}
    assert drawn["zeroshot"] == {k: m["zeroshot_test_acc"] for k, m in sorted(by_shots.items())}
    assert _png_is_drawn(s["dashboards"]["acc_vs_shots"])
