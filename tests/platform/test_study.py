"""``platform.study`` end to end on real EuroSAT with the ridge-aligned tiny ViT (zero-shot well above chance), and
``platform.evaluate`` on the prompts it learned.

One few-shot study (2 shot counts x 2 seeds, 3 epochs) and one base-to-new study (1 shot count, 1 seed) run on the
shared local Ray in this module; the tests check the table against the trials' own MLflow runs, the figure against
the table, and that a study registers nothing and stops no trial early.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path
from platform import evaluate, study

import numpy as np
import pytest
from cli_runs import child_runs as _children
from cli_runs import mlflow_client as _client
from cli_runs import run_cli as _run
from PIL import Image

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def studies(ray_session, small_eurosat_root, feature_cache, tiny_vit_config, aligned_vit_checkpoint,
            tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--dataset", "eurosat", "--data-root", str(small_eurosat_root), "--backbone", tiny_vit_config,
              "--pretrained", aligned_vit_checkpoint, "--batch-size", "8", "--n-views", "1",
              "--cache-dir", str(feature_cache), "--storage-path", str(tmp / "ray"), "--tracking-uri", uri,
              "--max-concurrent", "2", "--json"]
    fewshot = _run(study, [*common, "--shots", "1", "2", "--seeds", "1", "2", "--epochs", "3", "--study-name", "curve"])
    b2n = _run(study, [*common, "--protocol", "base2new", "--shots", "2", "--seeds", "1", "--epochs", "2",
                       "--study-name", "b2n"])
    packed = _run(study, [*common, "--shots", "1", "2", "--seeds", "1", "2", "--epochs", "3", "--pack-size", "4",
                          "--study-name", "curve-packed"])
    return {"uri": uri, "tmp": tmp, "fewshot": fewshot, "b2n": b2n, "common": common, "packed": packed}


def test_study_trains_every_shot_count_and_seed_to_the_end(studies):
    s = studies["fewshot"]["summary"]
    assert s["trials"] == 4 and s["trials_finished"] == 4 and s["trials_early_stopped"] == 0
    runs = _children(_client(studies["uri"]), s["parent_run_id"])
    grid = sorted((r.data.params["train.shots"], r.data.params["train.seed"]) for r in runs)
    assert grid == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.params["train.epochs"] == "3" for r in runs)


def test_a_packed_study_trains_the_same_grid_in_one_trial_with_the_same_results(studies):
    """shots x seeds as one pack of four (members of different shots train their own epochs and data): one run per
    cell, and each cell's accuracies those of the unpacked study's trial (one test image may flip)."""
    s = studies["packed"]["summary"]
    assert s["pack_size"] == 4 and s["trials"] == 4 and s["trials_finished"] == 4
    client = _client(studies["uri"])
    runs = _children(client, s["parent_run_id"])
    assert len({r.data.tags["coop.trial_id"].rsplit("-m", 1)[0] for r in runs}) == 1  # one Tune trial
    solo = {(r.data.params["train.shots"], r.data.params["train.seed"]): r.data.metrics
            for r in _children(client, studies["fewshot"]["summary"]["parent_run_id"])}
    packed = {(r.data.params["train.shots"], r.data.params["train.seed"]): r.data.metrics for r in runs}
    assert packed.keys() == solo.keys()
    for cell, metrics in packed.items():
        n_test = metrics["n_test"] if "n_test" in metrics else None
        flip = 100.0 / n_test if n_test else 5.0
        assert abs(metrics["test_acc"] - solo[cell]["test_acc"]) <= flip + 1e-9, cell
        assert metrics["zeroshot_test_acc"] == pytest.approx(solo[cell]["zeroshot_test_acc"]), cell
    assert [c["coop_mean"] for c in s["study"]["cells"]] == pytest.approx(
        [c["coop_mean"] for c in studies["fewshot"]["summary"]["study"]["cells"]], abs=5.0)


def test_study_table_is_the_mean_and_std_of_the_trials_runs(studies):
    s = studies["fewshot"]["summary"]
    results = s["study"]
    assert results["protocol"] == "fewshot" and results["shots"] == [1, 2] and results["seeds"] == [1, 2]
    runs = _children(_client(studies["uri"]), s["parent_run_id"])
    by = {(int(r.data.params["train.shots"]), r.data.params["train.seed"]): r.data.metrics for r in runs}
    assert [c["dataset"] for c in results["cells"]] == ["eurosat", "eurosat"]
    for cell in results["cells"]:
        k = cell["shots"]
        accs = [by[(k, seed)]["test_acc"] for seed in ("1", "2")]
        assert cell["coop_per_seed"] == pytest.approx({"1": accs[0], "2": accs[1]})
        assert cell["coop_mean"] == pytest.approx(statistics.fmean(accs))
        assert cell["coop_std"] == pytest.approx(statistics.stdev(accs))
        zs = [by[(k, seed)]["zeroshot_test_acc"] for seed in ("1", "2")]
        assert cell["zeroshot_mean"] == pytest.approx(statistics.fmean(zs))
        assert cell["zeroshot_mean"] > 20.0  # the aligned backbone: 10 classes, chance is 10 %
        assert cell["gain"] == pytest.approx(cell["coop_mean"] - cell["zeroshot_mean"])
    report = studies["fewshot"]["report"]
    assert "Study (fewshot): test accuracy over 2 seed(s) 1, 2; 4 of 4 trials counted" in report
    first = results["cells"][0]
    assert f"{first['coop_mean']:.2f} ± {first['coop_std']:.2f} (n=2)" in report


def test_study_logs_its_table_metrics_and_figure_to_its_run(studies):
    s = studies["fewshot"]["summary"]
    results = s["study"]
    client = _client(studies["uri"])
    parent = client.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["coop.entry_point"] == "platform.study"
    names = {f.path for f in client.list_artifacts(parent.info.run_id, "study")}
    assert names == {"study/acc_vs_shots.png", "study/results.json", "study/table.md"}
    history = client.get_metric_history(parent.info.run_id, "study/eurosat/test_acc_mean")
    assert {m.step: m.value for m in history} == pytest.approx({c["shots"]: c["coop_mean"] for c in results["cells"]})
    description = parent.data.tags["mlflow.note.content"]
    assert "## Results" in description and "| shots | dataset | CoOp test acc % (mean ± std)" in description
    local = Path(results["figure"])
    pixels = np.asarray(Image.open(local).convert("L"), dtype=float)
    assert pixels.std() > 10  # a drawn figure, not a blank canvas
    drawn = results["figure_data"]["eurosat"]
    assert drawn["shots"] == [1, 2] and drawn["coop_mean"] == pytest.approx([c["coop_mean"] for c in results["cells"]])
    assert drawn["seeds"]["1"] == pytest.approx(list(results["cells"][0]["coop_per_seed"].values()))
    assert not client.search_registered_models()  # a study measures, it registers nothing


def test_base_to_new_study_tests_base_and_new_classes_and_their_harmonic_mean(studies):
    s = studies["b2n"]["summary"]
    results = s["study"]
    assert [c["dataset"] for c in results["cells"]] == ["eurosat.base", "eurosat.new", "harmonic mean"]
    base, new, h = results["cells"]
    assert h["coop_mean"] == pytest.approx(2 * base["coop_mean"] * new["coop_mean"]
                                           / (base["coop_mean"] + new["coop_mean"]))
    assert h["zeroshot_mean"] == pytest.approx(2 * base["zeroshot_mean"] * new["zeroshot_mean"]
                                               / (base["zeroshot_mean"] + new["zeroshot_mean"]))
    (run,) = _children(_client(studies["uri"]), s["parent_run_id"])
    assert run.data.params["classes"] == "base"
    assert run.data.metrics["target/eurosat.new/n_test"] == 30  # 5 new classes x 6 test images
    assert run.data.metrics["target/eurosat.new/test_acc"] == pytest.approx(new["coop_mean"])
    config = json.loads(Path(_client(studies["uri"]).download_artifacts(run.info.run_id, "config.json",
                                                                          str(studies["tmp"]))).read_text())
    assert config["classnames"] == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                                    "Industrial Buildings"]
    assert config["split"].endswith("eurosat/split_zhou_EuroSAT.json")  # the split the run used


def test_evaluate_a_trials_prompts_on_the_new_classes_equals_the_trials_own_number(studies, small_eurosat_root,
                                                                                    feature_cache, capsys):
    s = studies["b2n"]["summary"]
    client = _client(studies["uri"])
    (run,) = _children(client, s["parent_run_id"])
    out = _run(evaluate, ["--model", run.info.run_id, "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
                          "--classes", "new", "--cache-dir", str(feature_cache), "--tracking-uri", studies["uri"],
                          "--json"])["summary"]
    assert out["dataset"] == "eurosat.new" and out["n_images"] == 30 and out["n_classes"] == 5
    assert out["acc"] == pytest.approx(run.data.metrics["target/eurosat.new/test_acc"])
    assert out["zeroshot_acc"] == pytest.approx(run.data.metrics["target/eurosat.new/zeroshot_test_acc"])
    logged = client.get_run(out["run_id"])
    assert logged.data.tags["coop.source_run_id"] == run.info.run_id
    assert logged.data.metrics["test_acc"] == pytest.approx(out["acc"])
    from coop_core.prompts_io import verified_digest

    kept = Path(logged.data.tags["coop.prompts"])  # the downloaded prompts, kept under their own digest
    assert kept.parent.name == verified_digest(kept)
    assert run.info.run_id in logged.data.tags["mlflow.note.content"]


def test_a_class_specific_base_study_cannot_test_on_new_classes(studies, capsys):
    rc = study.main([*[a for a in studies["common"] if a != "--json"], "--protocol", "base2new", "--csc",
                     "--shots", "1", "--seeds", "1", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "a class-specific context (--csc) cannot be evaluated on eurosat.new: 5 of its 5 classes" in line
    assert "use a unified context" in line


def test_base_to_new_over_two_datasets_reports_each_and_their_average(studies, shared_data, capsys):
    import os

    folder = studies["tmp"] / "land"
    for name in ("Forest", "Highway", "Pasture", "River"):
        (folder / name.lower()).mkdir(parents=True)
        for i in range(1, 13):
            os.symlink(shared_data / "eurosat" / "2750" / name / f"{name}_{i}.jpg", folder / name.lower() / f"{i}.jpg")
    common = [a for a in studies["common"] if a != "--json"]
    i = common.index("--dataset")
    argv = [*common[:i + 2], str(folder), *common[i + 2:]]  # --dataset eurosat <folder>
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = study.main([*argv, "--protocol", "base2new", "--shots", "1", "--seeds", "1", "--epochs", "1", "--json"])
    lines = out.getvalue().strip().splitlines()
    assert rc == 0, "\n".join(lines[-30:])
    combined = json.loads(lines[-1])
    assert set(combined["studies"]) == {"eurosat", str(folder)}
    cells = {c["dataset"]: c for c in combined["combined"]["cells"]}
    assert {"eurosat.base", "eurosat.new", "land.base", "land.new", "average.base", "average.new",
            "average harmonic mean"} <= set(cells)
    for role in ("base", "new"):
        assert cells[f"average.{role}"]["coop_mean"] == pytest.approx(
            (cells[f"eurosat.{role}"]["coop_mean"] + cells[f"land.{role}"]["coop_mean"]) / 2)
    b, n = cells["average.base"]["coop_mean"], cells["average.new"]["coop_mean"]
    assert cells["average harmonic mean"]["coop_mean"] == pytest.approx(2 * b * n / (b + n))
    run = _client(studies["uri"]).get_run(combined["combined_run_id"])
    assert json.loads(run.data.tags["coop.study_runs"]) == combined["studies"]
    assert "Study over 2 datasets (base2new)" in out.getvalue()


def test_a_study_can_take_the_champions_prompt_configuration(studies, tmp_path):
    from platform import tune

    uri = f"sqlite:///{tmp_path / 'champion.db'}"
    common = [uri if a == studies["uri"] else a for a in studies["common"]]
    common = [str(tmp_path / "ray") if a.endswith("/ray") else a for a in common]
    sweep = _run(tune, [*common, "--shots", "1", "--epochs", "1", "--grid", "prompt.n_ctx=3",
                        "prompt.class_token_position=front", "train.lr=0.004", "--sweep-name", "champion"])
    assert sweep["summary"]["registered_version"] == 1
    out = _run(study, [*common, "--from-champion", "--shots", "1", "--seeds", "1", "--epochs", "1",
                       "--study-name", "from-champion"])["summary"]
    (run,) = _children(_client(uri), out["parent_run_id"])
    params = run.data.params
    assert (params["prompt.n_ctx"], params["prompt.class_token_position"], params["train.lr"]) == ("3", "front",
                                                                                                   "0.004")


def test_a_study_comparing_methods_tables_each_method_and_averages_per_method():
    """Trials of several methods (the grid field ``method.name``): each method's base, new and H rows from its own
    trials only; over several datasets, each method's average of its own rows; MLflow metric names without the
    table's separator."""
    from platform.study import metric_label
    from platform.study_table import combine, format_table, study_results

    def row(method: str, seed: int, base: float, new: float, new_label: str = "eurosat.new") -> dict:
        return {"finished": True, "config": {"train.shots": 16, "train.seed": seed, "method.name": method},
                "last_result": {"test_acc": base, "zeroshot_test_acc": 50.0,
                                f"target/{new_label}/test_acc": new, f"target/{new_label}/zeroshot_test_acc": 60.0}}

    rows = [row("coop", 1, 90.0, 40.0), row("kgcoop", 1, 80.0, 70.0), row("coop", 2, 80.0, 50.0),
            row("kgcoop", 2, 70.0, 60.0)]
    one = study_results(rows, "base2new", "eurosat.base", ["eurosat.new"])
    assert one["methods"] == ["coop", "kgcoop"]
    cells = {(c["method"], c["source_dataset"]): c for c in one["cells"]}
    assert cells[("coop", "eurosat.base")]["coop_mean"] == 85.0
    assert cells[("kgcoop", "eurosat.new")]["coop_mean"] == 65.0
    assert cells[("kgcoop", "harmonic mean")]["coop_per_seed"] == {"1": pytest.approx(2 * 80 * 70 / 150),
                                                                    "2": pytest.approx(2 * 70 * 60 / 130)}
    assert "eurosat.base · kgcoop" in format_table(one) and "prompts test acc" in format_table(one)
    assert metric_label(cells[("kgcoop", "harmonic mean")]) == "kgcoop/harmonic mean"
    other = study_results([row("coop", 1, 70.0, 20.0, "dtd.new"), row("kgcoop", 1, 60.0, 50.0, "dtd.new")],
                          "base2new", "dtd.base",
                          ["dtd.new"])
    both = combine([one, other], "base2new")
    averages = {(c["method"], c["source_dataset"]): c["coop_mean"] for c in both["cells"]
                if c["source_dataset"].startswith("average")}
    assert averages[("coop", "average.base")] == pytest.approx((85.0 + 70.0) / 2)
    assert averages[("kgcoop", "average.new")] == pytest.approx((65.0 + 50.0) / 2)
