"""CoOp's domain-generalisation protocol end to end: ``platform.study --protocol dg`` trains on ImageNet and tests the
same prompts on ImageNet-V2, -Sketch, -A and -R, found under ``--data-root`` by themselves.

The trees are synthetic, in CoOp's layouts, with the real class lists (ImageNet's 1,000 wnids and names, A's and R's
200 wnids; ``synthetic_imagenet.py``), every image a symlink to a real EuroSAT JPEG: accuracy means nothing here,
the folder layouts, the class mapping and the counts are what is checked. The variants hold different numbers of
images so that each target's count (after ``--max-test-items``) is its own. One study trains a unified context,
one a class-specific (CSC) context over the 1,000 classes, which A and R take by class name.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from platform import evaluate, study

import pytest
from cli_runs import mlflow_client as _client
from cli_runs import run_cli as _run
from synthetic_imagenet import build_imagenet_root

pytestmark = [pytest.mark.ray, pytest.mark.long]  # whole studies on synthetic ImageNet trees

MAX_TEST = 300
# Class folders given one image each: V2 all 1,000 (cut to MAX_TEST), Sketch 250 of 1,000, A all 200, R 120 of 200.
VARIANT_CLASSES = {"imagenet_v2": 1000, "imagenet_sketch": 250, "imagenet_a": 200, "imagenet_r": 120}
TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def _trial(uri: str, parent_run_id: str):
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    (run,) = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return run


@pytest.fixture(scope="module")
def dg(ray_session, shared_data, tiny_vit_config, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dg")
    images = sorted((shared_data / "eurosat" / "2750").glob("*/*_1.jpg"))  # one real JPEG of each of 10 classes
    root = tmp / "data"
    counts = build_imagenet_root(root, images, variant_classes=VARIANT_CLASSES)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--protocol", "dg", "--dataset", "imagenet", "--data-root", str(root), "--backbone", tiny_vit_config,
              "--pretrained", "none", "--shots", "1", "--seeds", "1", "--epochs", "1", "--n-ctx", "2",
              "--batch-size", "32", "--n-views", "1", "--max-test-items", str(MAX_TEST), "--cache-dir",
              str(tmp / "cache"), "--storage-path", str(tmp / "ray"), "--tracking-uri", uri, "--json"]
    unified = _run(study, [*common, "--study-name", "dg"])
    csc = _run(study, [*common, "--csc", "--study-name", "dg-csc"])
    return {"tmp": tmp, "root": root, "uri": uri, "counts": counts, "unified": unified, "csc": csc}


@pytest.mark.parametrize("kind", ["unified", "csc"])
def test_dg_study_tests_imagenet_and_the_four_targets_it_found(dg, kind):
    results = dg[kind]["summary"]["study"]
    assert results["protocol"] == "dg" and results["source"] == "imagenet" and results["targets"] == TARGETS
    assert [c["dataset"] for c in results["cells"]] == ["imagenet", *TARGETS, "average over targets"]
    run = _trial(dg["uri"], dg[kind]["summary"]["parent_run_id"])
    m = run.data.metrics
    assert run.data.params["prompt.csc"] == str(kind == "csc")
    cells = {c["dataset"]: c for c in results["cells"]}
    assert cells["imagenet"]["coop_mean"] == pytest.approx(m["test_acc"])
    for target in TARGETS:
        assert m[f"target/{target}/n_test"] == min(dg["counts"][target], MAX_TEST), target
        assert cells[target]["coop_mean"] == pytest.approx(m[f"target/{target}/test_acc"])
        assert cells[target]["zeroshot_mean"] == pytest.approx(m[f"target/{target}/zeroshot_test_acc"])
    average = cells["average over targets"]
    assert average["coop_mean"] == pytest.approx(statistics.fmean(cells[t]["coop_mean"] for t in TARGETS))
    assert average["zeroshot_mean"] == pytest.approx(statistics.fmean(cells[t]["zeroshot_mean"] for t in TARGETS))
    config = json.loads(Path(_client(dg["uri"]).download_artifacts(run.info.run_id, "config.json",
                                                                    str(dg["tmp"] / f"cfg-{kind}"))).read_text())
    assert len(config["classnames"]) == 1000 and config["classnames"][:2] == ["tench", "goldfish"]
    assert config["n_train"] == 1000 and config["n_test"] == MAX_TEST


def test_csc_prompts_evaluate_on_imagenet_r_by_class_name(dg):
    run = _trial(dg["uri"], dg["csc"]["summary"]["parent_run_id"])
    out = _run(evaluate, ["--model", run.info.run_id, "--dataset", "imagenet_r", "--data-root", str(dg["root"]),
                          "--cache-dir", str(dg["tmp"] / "cache"), "--tracking-uri", dg["uri"], "--json"])["summary"]
    assert out["dataset"] == "imagenet_r" and out["n_classes"] == 200
    assert out["n_images"] == VARIANT_CLASSES["imagenet_r"]  # under --max-test-items: the same images as the trial
    assert out["acc"] == pytest.approx(run.data.metrics["target/imagenet_r/test_acc"])
    assert out["zeroshot_acc"] == pytest.approx(run.data.metrics["target/imagenet_r/zeroshot_test_acc"])
    logged = _client(dg["uri"]).get_run(out["run_id"])
    assert logged.data.tags["coop.source_run_id"] == run.info.run_id
    assert logged.data.params["source.classes"] == "1000" and logged.data.params["prompt.csc"] == "True"


def test_csc_prompt_file_on_classes_it_was_not_trained_on_is_refused(dg, small_eurosat_root, capsys):
    run = _trial(dg["uri"], dg["csc"]["summary"]["parent_run_id"])
    prompts = _client(dg["uri"]).download_artifacts(run.info.run_id, "prompts/prompts.safetensors",
                                                    str(dg["tmp"] / "csc-prompts"))
    rc = evaluate.main(["--model", prompts, "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
                        "--cache-dir", str(dg["tmp"] / "cache"), "--tracking-uri", dg["uri"]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: cannot evaluate these prompts on eurosat: the class-specific context has no vector "
                           "for 10 of the 10 target classes")
    assert "a class-specific context only transfers to classes it was trained on" in line
