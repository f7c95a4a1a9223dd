"""A user's own image folder end to end: ``--dataset <folder>`` through ``platform.train``, ``platform.tune``,
``platform.evaluate`` (as the folder, as a CSV manifest of the same images) and as an evaluation target of a
``platform.study``; and the bad inputs of a user's data refused in one line before Ray starts.

The folder is real EuroSAT (4 classes x 20 JPEGs, symlinked) under folder names a user would choose (``annual_crop``,
``sea_lake``); the backbone is the tiny ViT ridge-aligned to EuroSAT's zero-shot prompts (``tests/aligned.py``). All
CLIs run in this process (``main(argv)``) on the shared local Ray, with tiny epochs.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from platform import evaluate, study, train, tune

import pytest
from cli_runs import forbid_ray_start
from cli_runs import mlflow_client as _client
from cli_runs import run_cli as _run

pytestmark = pytest.mark.ray

# Folder name -> EuroSAT class folder it takes its images from.
CLASSES = {"annual_crop": "AnnualCrop", "forest": "Forest", "river": "River", "sea_lake": "SeaLake"}
PER_CLASS = 20  # the generated 50/20/30 split: 10 train, 4 val, 6 test per class
READABLE = ["annual crop", "forest", "river", "sea lake"]
# EuroSAT's own names and template, which the aligned backbone's image projection was fitted to.
EUROSAT_NAMES = {"annual_crop": "Annual Crop Land", "forest": "Forest", "river": "River", "sea_lake": "Sea or Lake"}
EUROSAT_TEMPLATE = "a centered satellite photo of {}."


def _config(uri: str, run_id: str, dst: Path) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    return json.loads(Path(_client(uri).download_artifacts(run_id, "config.json", str(dst))).read_text())


def make_user_folder(shared_data: Path, folder: Path) -> Path:
    """``folder/<class>/<image>.jpg``: the first PER_CLASS real EuroSAT images of each class, symlinked."""
    for name, source in CLASSES.items():
        (folder / name).mkdir(parents=True)
        for image in sorted((shared_data / "eurosat" / "2750" / source).glob("*.jpg"))[:PER_CLASS]:
            os.symlink(image, folder / name / image.name)
    return folder


@pytest.fixture(scope="module")
def own(ray_session, shared_data, tiny_vit_config, aligned_vit_checkpoint, tmp_path_factory) -> dict:
    """Two ``platform.train`` runs (seeds 1 and 2) and one ``platform.tune`` sweep on the user's folder."""
    tmp = tmp_path_factory.mktemp("own")
    folder = make_user_folder(shared_data, tmp / "land_cover")
    cache, uri = tmp / "cache", f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--dataset", str(folder), "--backbone", tiny_vit_config, "--pretrained", aligned_vit_checkpoint,
              "--shots", "2", "--epochs", "1", "--batch-size", "8", "--n-views", "1", "--cache-dir", str(cache),
              "--storage-path", str(tmp / "ray"), "--tracking-uri", uri, "--json"]
    first = _run(train, [*common, "--seed", "1"])
    split_files = sorted((cache / "splits").glob("*.json"))
    snapshot = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in split_files}
    second = _run(train, [*common, "--seed", "2"])
    after_second = sorted((cache / "splits").glob("*.json"))
    sweep = _run(tune, [*common, "--dataset-name", "my_land", "--num-samples", "2", "--max-concurrent", "2",
                        "--fixed", "prompt.csc"])  # a unified context: it may be evaluated under other class names
    return {"tmp": tmp, "folder": folder, "cache": cache, "uri": uri, "first": first, "second": second,
            "sweep": sweep, "split_files": split_files, "after_second": after_second, "snapshot": snapshot,
            "eval_common": ["--cache-dir", str(cache), "--tracking-uri", uri, "--json"]}


# -- platform.train --------------------------------------------------------------------------------------------------


@pytest.mark.long  # the end-to-end run on a folder of your own: train, sweep, register, evaluate
def test_train_on_a_folder_logs_to_the_folders_experiment_with_its_classes(own):
    first = own["first"]["summary"]
    assert first["experiment"] == "coop-land_cover" and first["dataset"] == "land_cover"
    client = _client(own["uri"])
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "coop-land_cover"
    config = _config(own["uri"], first["run_id"], own["tmp"] / "cfg1")
    assert config["dataset"] == "land_cover"
    assert config["classnames"] == READABLE  # readable names from the folder names, in sorted folder order
    assert config["source"]["path"] == str(own["folder"])
    assert config["source"]["split_file"] is None and config["source"]["split_seed"] == 1
    assert config["n_test"] == 4 * 6 and config["n_train"] == 4 * 2  # the generated split; 2 shots of 4 classes
    # The printed accuracies are the run's MLflow metrics, and shares of the 24 test images.
    print(f"\nown folder: test {first['test_acc']} %, zero-shot {first['zeroshot_test_acc']} %")
    for key in ("test_acc", "zeroshot_test_acc"):
        assert first[key] == pytest.approx(run.data.metrics[key]), key
        correct = first[key] * config["n_test"] / 100
        assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= config["n_test"], (key, first[key])


@pytest.mark.long
def test_the_generated_split_is_written_once_under_the_cache_and_reused(own):
    (split_file,) = own["split_files"]  # one file, from the first run
    assert split_file.parent == own["cache"] / "splits" and split_file.name.startswith("land_cover-")
    split = json.loads(split_file.read_text())
    assert {k: len(v) for k, v in split.items()} == {"train": 40, "val": 16, "test": 24}
    for name in ("train", "val", "test"):  # stratified: every class in every split, paths inside the folder
        assert sorted({label for _, label, _ in split[name]}) == [0, 1, 2, 3]
        assert all((own["folder"] / path).is_file() for path, _, _ in split[name])
    assert f"split read from {split_file}" in own["second"]["stderr"]
    assert own["after_second"] == [split_file]  # the second run wrote nothing new
    mtime, content = own["snapshot"][split_file]
    assert split_file.stat().st_mtime_ns == mtime and split_file.read_bytes() == content
    second = _config(own["uri"], own["second"]["summary"]["run_id"], own["tmp"] / "cfg2")
    assert second["seed"] == 2 and second["n_test"] == 24 and second["classnames"] == READABLE


@pytest.mark.long
def test_config_json_names_the_split_file_the_run_used(own):
    (split_file,) = own["split_files"]
    config = _config(own["uri"], own["first"]["summary"]["run_id"], own["tmp"] / "cfg3")
    assert config["split"] == str(split_file)


# -- platform.tune ---------------------------------------------------------------------------------------------------


def _champion(own):
    from platform.registry import CHAMPION

    client = _client(own["uri"])
    version = client.get_model_version_by_alias("coop-my_land", CHAMPION)
    return version, client.get_run(version.run_id)


@pytest.mark.long
def test_tune_registers_the_folder_under_its_dataset_name_as_champion(own):
    s = own["sweep"]["summary"]
    assert s["trials"] == 2 and s["trials_completed"] == 2
    assert s["registered_model"] == "coop-my_land" and s["registered_version"] == 1 and s["champion_version"] == 1
    version, run = _champion(own)
    assert int(version.version) == 1 and version.tags["dataset"] == "my_land"
    assert json.loads(version.tags["classnames"]) == READABLE
    assert version.tags["trial_id"] == s["best_trial_id"]
    client = _client(own["uri"])
    assert client.get_experiment(run.info.experiment_id).name == "coop-my_land"
    assert run.data.metrics["val_acc"] == pytest.approx(s["val_acc"])


# -- platform.evaluate -----------------------------------------------------------------------------------------------


@pytest.mark.long
def test_evaluate_the_champion_on_the_folder_gives_the_trials_own_test_accuracy(own):
    version, run = _champion(own)
    out = _run(evaluate, ["--model", "models:/coop-my_land@champion", "--dataset", str(own["folder"]),
                          *own["eval_common"]])["summary"]
    assert out["dataset"] == "land_cover" and out["n_classes"] == 4 and out["n_images"] == 24
    assert out["acc"] == pytest.approx(run.data.metrics["test_acc"])
    assert out["zeroshot_acc"] == pytest.approx(run.data.metrics["zeroshot_test_acc"])
    logged = _client(own["uri"]).get_run(out["run_id"])
    assert logged.data.tags["coop.source_run_id"] == version.run_id
    assert logged.data.tags["coop.source_model"] == "models:/coop-my_land@champion"
    assert logged.data.metrics["test_acc"] == pytest.approx(out["acc"])


def _write_manifest(own, name: str, with_split: bool) -> Path:
    """A CSV manifest of the folder's images (paths relative to the folder), with the generated split's column."""
    (split_file,) = own["split_files"]
    split_of = {path: split for split, items in json.loads(split_file.read_text()).items() for path, _, _ in items}
    path = own["folder"] / name
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "split"] if with_split else ["path", "class"])
        for image, split in sorted(split_of.items()):
            writer.writerow([image, image.split("/")[0], split] if with_split else [image, image.split("/")[0]])
    return path


@pytest.mark.long
def test_evaluate_on_a_csv_manifest_of_the_same_images_gives_the_same_numbers(own):
    _, run = _champion(own)
    manifest = _write_manifest(own, "land_cover.csv", with_split=True)
    out = _run(evaluate, ["--model", "models:/coop-my_land@champion", "--dataset", str(manifest),
                          *own["eval_common"]])["summary"]
    assert out["dataset"] == "land_cover" and out["n_classes"] == 4 and out["n_images"] == 24
    assert out["acc"] == pytest.approx(run.data.metrics["test_acc"])
    assert out["zeroshot_acc"] == pytest.approx(run.data.metrics["zeroshot_test_acc"])


@pytest.mark.long
def test_template_and_classnames_file_reach_the_zero_shot_classifier(own):
    """With EuroSAT's own names and template -- what the aligned backbone was fitted to -- zero-shot CLIP beats the
    folder names under the default template; the learned (unified) context is unchanged by the template."""
    _, run = _champion(own)
    names = own["tmp"] / "names.txt"
    names.write_text("".join(f"{folder} {name}\n" for folder, name in EUROSAT_NAMES.items()))
    base = ["--model", "models:/coop-my_land@champion", "--dataset", str(own["folder"]), *own["eval_common"]]
    templated = _run(evaluate, [*base, "--template", EUROSAT_TEMPLATE])["summary"]
    assert templated["template"] == EUROSAT_TEMPLATE
    assert templated["acc"] == pytest.approx(run.data.metrics["test_acc"])  # CoOp prompts do not use the template
    named = _run(evaluate, [*base, "--template", EUROSAT_TEMPLATE, "--classnames-file", str(names)])["summary"]
    logged = _client(own["uri"]).get_run(named["run_id"])
    assert logged.data.params["target.template"] == EUROSAT_TEMPLATE and named["n_images"] == 24
    assert named["zeroshot_acc"] > run.data.metrics["zeroshot_test_acc"] + 10, (named, run.data.metrics)
    assert named["zeroshot_acc"] > 50.0  # 4 classes: chance is 25 %


# -- a folder as a study's evaluation target -------------------------------------------------------------------------


@pytest.mark.long
def test_a_folder_is_an_evaluation_target_of_a_cross_dataset_study(own, small_eurosat_root, tiny_vit_config,
                                                                   aligned_vit_checkpoint):
    tmp = own["tmp"]
    out = _run(study, ["--protocol", "cross", "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
                       "--targets", str(own["folder"]), "--shots", "1", "--seeds", "1", "--epochs", "1",
                       "--backbone", tiny_vit_config, "--pretrained", aligned_vit_checkpoint, "--batch-size", "8",
                       "--n-views", "1", "--cache-dir", str(own["cache"]), "--storage-path", str(tmp / "ray"),
                       "--tracking-uri", own["uri"], "--max-concurrent", "2", "--study-name", "cross", "--json"])
    results = out["summary"]["study"]
    assert results["protocol"] == "cross" and results["targets"] == ["land_cover"]
    assert [c["dataset"] for c in results["cells"]] == ["eurosat", "land_cover", "average over targets"]
    client = _client(own["uri"])
    parent = client.get_run(out["summary"]["parent_run_id"])
    (trial,) = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    m = trial.data.metrics
    source, target, average = results["cells"]
    assert source["coop_mean"] == pytest.approx(m["test_acc"])
    assert target["coop_mean"] == pytest.approx(m["target/land_cover/test_acc"])
    assert target["zeroshot_mean"] == pytest.approx(m["target/land_cover/zeroshot_test_acc"])
    assert m["target/land_cover/n_test"] == 24  # the folder's generated test split
    assert average["coop_mean"] == pytest.approx(target["coop_mean"])  # one target: its own numbers
    assert "land_cover" in out["report"] and "average over targets" in out["report"]


# -- bad input -------------------------------------------------------------------------------------------------------


def refused(capsys, monkeypatch, argv: list[str], cli=train) -> str:
    """Run the CLI on ``argv``; assert exit status 2, one ``error:`` line, no traceback, and Ray never started."""
    forbid_ray_start(monkeypatch)
    try:
        rc = cli.main(argv)
    except SystemExit as exited:  # argparse's usage errors
        rc = exited.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def base(tmp_path, tiny_vit_config) -> list[str]:
    """A valid ``platform.train`` command line except for ``--dataset``, which each test adds."""
    return ["--backbone", tiny_vit_config, "--pretrained", "none", "--shots", "1", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "ray"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.fixture
def user_folder(tmp_path, shared_data) -> Path:
    return make_user_folder(shared_data, tmp_path / "land_cover")


def test_dataset_path_that_does_not_exist(capsys, monkeypatch, base, tmp_path):
    missing = tmp_path / "no_such_photos"
    line = refused(capsys, monkeypatch, [*base, "--dataset", str(missing)])
    assert f"dataset '{missing}' is neither a built-in dataset" in line
    assert "nor an existing folder or manifest file" in line


def test_empty_class_folder(capsys, monkeypatch, base, user_folder):
    (user_folder / "wetland").mkdir()
    line = refused(capsys, monkeypatch, [*base, "--dataset", str(user_folder)])
    assert f"class folder {user_folder / 'wetland'} has no images" in line and "remove the folder" in line


def test_class_folders_that_collide_after_clean_up(capsys, monkeypatch, base, user_folder):
    for name in ("Cat", "cat"):
        (user_folder / name).mkdir()
        os.symlink(next((user_folder / "forest").iterdir()).resolve(), user_folder / name / "a.jpg")
    line = refused(capsys, monkeypatch, [*base, "--dataset", str(user_folder)])
    assert "classes 'Cat' and 'cat'" in line and "both read as" in line and "CLIP cannot tell them apart" in line


def test_manifest_path_outside_its_folder(capsys, monkeypatch, base, user_folder):
    outside = user_folder.parent / "x.jpg"
    os.symlink(next((user_folder / "river").iterdir()).resolve(), outside)  # it exists: only its place is wrong
    manifest = user_folder / "images.csv"
    rows = "".join(f"forest/{p.name},forest\n" for p in (user_folder / "forest").iterdir())
    manifest.write_text(f"path,class\n{rows}../x.jpg,river\n")
    line = refused(capsys, monkeypatch, [*base, "--dataset", str(manifest)])
    assert f"row {PER_CLASS + 1} names '../x.jpg', outside the manifest's folder" in line and "no '..'" in line


def test_dataset_name_of_a_built_in_dataset(capsys, monkeypatch, base, user_folder):
    line = refused(capsys, monkeypatch, [*base, "--dataset", str(user_folder), "--dataset-name", "eurosat"])
    assert "'eurosat' is the built-in dataset's name; pass another name (--dataset-name)" in line


def test_template_without_a_placeholder(capsys, monkeypatch, base, user_folder):
    line = refused(capsys, monkeypatch, [*base, "--dataset", str(user_folder), "--template", "a satellite photo"])
    assert "template must contain exactly one '{}' for the class name, got 'a satellite photo'" in line


def test_dataset_name_with_a_registry_dataset(capsys, monkeypatch, base, small_eurosat_root):
    line = refused(capsys, monkeypatch, [*base, "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
                                         "--dataset-name", "mine"])
    assert "--dataset-name applies to your own data (--dataset PATH), not to the built-in dataset 'eurosat'" in line


@pytest.mark.parametrize("cli", [tune, study, evaluate], ids=lambda c: c.__name__.split(".")[-1])
def test_every_cli_refuses_a_folder_path_that_does_not_exist(capsys, monkeypatch, base, tmp_path, cli):
    missing = tmp_path / "no_such_photos"
    argv = (["--model", str(tmp_path / "p.safetensors"), "--dataset", str(missing), "--cache-dir",
             str(tmp_path / "cache"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"] if cli is evaluate
            else [*base, "--dataset", str(missing)])
    line = refused(capsys, monkeypatch, argv, cli=cli)
    assert f"dataset '{missing}' is neither a built-in dataset" in line
