"""Every bad input of the README's "Bad input" table: exit status 2, one ``error:`` line that names the problem and
the fix, no traceback, refused in seconds and before Ray starts (the few that are not errors -- a missing split file,
``--shots all`` -- are shown to pass the same checks).

The CLIs run in this process (``main(argv)``); ``refused`` times each refusal. Inputs are a small real-EuroSAT root
(images symlinked, split files written per test) and the tiny ViT with random weights.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shlex
import shutil
import threading
import time
from pathlib import Path
from platform import evaluate, study, train, tune

import pytest
import torch
from cli_runs import forbid_ray_start

# The README's "Bad input": each check takes under 1 s (measured: at most 0.59 s, --shots 100000 reading EuroSAT's
# 27,000-entry split, with the 2 cores shared, load average 4; an unreachable tracking server 0.003 s); the bound
# leaves room for a busier machine and is what the README says the tests guard.
REFUSE_WITHIN_S = 2.0


@pytest.fixture
def base(tmp_path, small_eurosat_root, tiny_vit_config) -> list[str]:
    """A valid ``platform.train`` command line: every test changes one thing."""
    return ["--dataset", "eurosat", "--data-root", str(small_eurosat_root), "--backbone", tiny_vit_config,
            "--pretrained", "none", "--shots", "2", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
            "--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def with_flag(argv: list[str], flag: str, value: str | None = None) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced when present, added otherwise)."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        del out[i : i + 2]
    return [*out, flag] if value is None else [*out, flag, value]


def refused(capsys, argv: list[str], cli=train) -> tuple[str, float]:
    """Run the CLI on ``argv``; assert it refused the input as the table promises; return the line and the time.

    Ray is forbidden to start meanwhile (``forbid_ray_start``): the suite's shared Ray may already be up, so whether
    it is initialised afterwards would prove nothing.
    """
    with pytest.MonkeyPatch.context() as patch:
        forbid_ray_start(patch)
        t0 = time.perf_counter()
        try:
            rc = cli.main(argv)
        except SystemExit as exited:  # argparse's usage errors
            rc = exited.code
        seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Ray was started" not in err  # forbid_ray_start's error, had a CLI turned it into its one line
    assert seconds < REFUSE_WITHIN_S, seconds
    return errors[0], seconds


def data_root(tmp_path: Path, shared_data: Path, split: dict | str | None) -> Path:
    """A data root with the real EuroSAT images and ``split`` as its split file (a dict, raw text, or none)."""
    root = tmp_path / "data"
    (root / "eurosat").mkdir(parents=True)
    os.symlink(shared_data / "eurosat" / "2750", root / "eurosat" / "2750")
    if split is not None:
        text = split if isinstance(split, str) else json.dumps(split)
        (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(text)
    return root


@pytest.fixture
def small_split(small_eurosat_root) -> dict:
    return json.loads((small_eurosat_root / "eurosat" / "split_zhou_EuroSAT.json").read_text())


# -- data --------------------------------------------------------------------------------------------------------------


def test_unknown_dataset(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--dataset", "mnist"))
    assert line.startswith("error: dataset 'mnist' is neither a built-in dataset (caltech101, dtd, eurosat, ")
    assert "nor an existing folder or manifest file; pass a registry key, or the path to your images" in line


def test_unknown_preset(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--preset", "coop_vit_h14"))
    assert "argument --preset: unknown preset 'coop_vit_h14'" in line and "coop_rn50_end" in line


def test_training_on_an_evaluation_only_dataset(capsys, tmp_path, base):
    sketch = tmp_path / "root" / "imagenet-sketch" / "images" / "n01440764"
    sketch.mkdir(parents=True)
    (sketch / "a.JPEG").write_bytes(b"")
    line, _ = refused(capsys, with_flag(with_flag(base, "--dataset", "imagenet_sketch"), "--data-root",
                                        str(tmp_path / "root")))
    assert "imagenet_sketch is an evaluation-only dataset" in line and "train on imagenet" in line


def test_data_root_missing(capsys, base, tmp_path):
    line, _ = refused(capsys, with_flag(base, "--data-root", str(tmp_path / "nowhere")))
    assert line.startswith(f"error: dataset 'eurosat' not found: {tmp_path / 'nowhere' / 'eurosat' / '2750'} does "
                           "not exist")


def test_split_file_missing_falls_back_with_a_warning(tmp_path, shared_data, base, caplog):
    from platform.cli import spec_from_args
    from platform.launch import check_inputs

    root = data_root(tmp_path, shared_data, None)
    args = train.build_parser().parse_args(with_flag(base, "--data-root", str(root)))
    with caplog.at_level(logging.WARNING, logger="coop_core.datasets.eurosat"):
        splits = check_inputs(spec_from_args(args, use_gpu=False))
    assert "split_zhou_EuroSAT.json not found: using a deterministic 50/20/30 per-class split" in caplog.text
    assert len(splits.train) == 13_500 and len(splits.test) == 27_000 - 13_500 - 5_400


def test_split_file_malformed(capsys, tmp_path, shared_data, base):
    root = data_root(tmp_path, shared_data, '{"train": [["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual')
    line, _ = refused(capsys, with_flag(base, "--data-root", str(root)))
    assert "split_zhou_EuroSAT.json is not valid JSON" in line and "replace it with CoOp's split file" in line


def test_split_entry_outside_the_data_root(capsys, tmp_path, shared_data, base, small_split):
    small_split["train"][3][0] = "../../../etc/passwd"
    line, _ = refused(capsys, with_flag(base, "--data-root", str(data_root(tmp_path, shared_data, small_split))))
    assert "train[3] names '../../../etc/passwd', outside the image folder" in line and "no '..'" in line


def test_split_entry_naming_a_missing_image(capsys, tmp_path, shared_data, base, small_split):
    small_split["test"][0][0] = "AnnualCrop/AnnualCrop_999999.jpg"
    line, _ = refused(capsys, with_flag(base, "--data-root", str(data_root(tmp_path, shared_data, small_split))))
    assert "1 of 100 images the run needs are not under" in line and "'AnnualCrop/AnnualCrop_999999.jpg'" in line


def test_empty_class(capsys, tmp_path, shared_data, base, small_split):
    small_split["train"] = [entry for entry in small_split["train"] if entry[1] != 4]  # Industrial: val/test only
    line, _ = refused(capsys, with_flag(base, "--data-root", str(data_root(tmp_path, shared_data, small_split))))
    assert "1 class(es) of eurosat have no training images (first: 'Industrial Buildings')" in line


def test_class_name_that_tokenizes_to_nothing(capsys, tmp_path, shared_data, base, small_split):
    for split in ("train", "val", "test"):
        for entry in small_split[split]:
            if entry[1] == 1:
                entry[2] = "___"  # becomes "" once underscores are spaces
    line, _ = refused(capsys, with_flag(base, "--data-root", str(data_root(tmp_path, shared_data, small_split))))
    assert "Item.classname must be a non-empty string" in line and "train[" in line


def test_class_name_that_overflows_the_context(capsys, tmp_path, shared_data, base, small_split):
    long_name = " ".join(["forest"] * 80)
    for split in ("train", "val", "test"):
        for entry in small_split[split]:
            if entry[1] == 1:
                entry[2] = long_name
    line, _ = refused(capsys, with_flag(base, "--data-root", str(data_root(tmp_path, shared_data, small_split))))
    assert "is 80 tokens, too long for the text context of 77 tokens with any context; shorten it" in line


def test_shots_larger_than_the_smallest_class(capsys, shared_data, base):
    line, _ = refused(capsys, with_flag(with_flag(base, "--data-root", str(shared_data)), "--shots", "100000"))
    assert "shots 100000 is more than the smallest class has: 'Pasture Land' has 1000 training images" in line
    assert "--shots all" in line


def test_shots_all_is_accepted_explicitly(base, tmp_path):
    from platform.cli import spec_from_args
    from platform.launch import check_inputs

    args = train.build_parser().parse_args(with_flag(base, "--shots", "all"))
    splits = check_inputs(spec_from_args(args, use_gpu=False))
    manifests = list((tmp_path / "cache").glob("fewshot_eurosat_allshot_*.parquet"))
    assert len(manifests) == 1 and len(splits.train) == 80  # the few-shot split is every training image


# -- prompt ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ctx", ["0", "-3"])
def test_n_ctx_not_positive(capsys, base, n_ctx):
    line, _ = refused(capsys, with_flag(base, "--n-ctx", n_ctx))
    assert f"n_ctx must be a positive integer, got {n_ctx}" in line


def test_n_ctx_too_long_for_the_context(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--n-ctx", "75"))
    assert "n_ctx must be <= 64 (the prompt must fit CLIP's 77-token context), got 75" in line


def test_ctx_init_longer_than_the_context(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--ctx-init", " ".join(["satellite"] * 80)))
    assert "ctx_init 'satellite satellite" in line and "is 80 tokens" in line and "a shorter --ctx-init" in line


def test_unknown_class_token_position(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--class-token-position", "left"))
    assert "invalid choice: 'left' (choose from 'end', 'middle', 'front')" in line


def test_search_space_value_that_cannot_fit(capsys, base, tmp_path):
    """A sweep checks every prompt its trials may build: here one grid value of ctx_init is too long."""
    long_init = " ".join(["photo"] * 74)
    argv = [*with_flag(base, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"), "--grid",
            f"prompt.ctx_init=a photo of a,{long_init}"]
    line, _ = refused(capsys, argv, cli=tune)
    assert "ctx_init 'photo photo" in line and "is 74 tokens" in line


# -- backbone and weights ----------------------------------------------------------------------------------------------


def test_unknown_backbone(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--backbone", "ViT-X-99"))
    assert "unknown open_clip architecture 'ViT-X-99'; use one of open_clip.list_models()" in line


def test_missing_checkpoint_file(capsys, base, tmp_path):
    line, _ = refused(capsys, with_flag(base, "--pretrained", str(tmp_path / "missing.pt")))
    assert line == f"error: checkpoint file not found: {tmp_path / 'missing.pt'}"


def test_checkpoint_of_the_wrong_architecture(capsys, base, tmp_path, tiny_rn_config):
    from coop_core.backbone import load_clip

    torch.save(load_clip(tiny_rn_config, "none").model.state_dict(), tmp_path / "rn.pt")
    line, _ = refused(capsys, with_flag(base, "--pretrained", str(tmp_path / "rn.pt")))
    assert "does not fit the architecture tiny-vit" in line and "pass the --backbone it was trained with" in line


# -- sweep-only inputs -------------------------------------------------------------------------------------------------


def test_search_space_override_naming_an_unknown_field(capsys, base):
    line, _ = refused(capsys, [*base, "--fixed", "prompt.depth"], cli=tune)
    assert "--fixed prompt.depth: not searched for eurosat; searched fields: prompt.n_ctx" in line
    line, _ = refused(capsys, [*base, "--grid", "prompt.depth=2,4"], cli=tune)
    assert "--grid 'prompt.depth=2,4': prompt has no field 'depth'" in line


# -- tracking, folders -------------------------------------------------------------------------------------------------


def test_tracking_server_unreachable(capsys, base):
    line, _ = refused(capsys, with_flag(base, "--tracking-uri", "http://127.0.0.1:9"))  # within REFUSE_WITHIN_S
    assert line.startswith("error: MLflow tracking server http://127.0.0.1:9 is unreachable (")
    assert "mlflow server --host 127.0.0.1" in line


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_tracking_server_answering_with_errors(capsys, base):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        line, _ = refused(capsys, with_flag(base, "--tracking-uri", uri))
    finally:
        server.shutdown()
    assert f"MLflow tracking server {uri} answers with errors (HTTP 503" in line


def test_tracking_store_that_is_not_a_database(capsys, base, tmp_path):
    (tmp_path / "notes.db").write_text("not sqlite")
    line, _ = refused(capsys, with_flag(base, "--tracking-uri", f"sqlite:///{tmp_path / 'notes.db'}"))
    assert "cannot be opened as an SQLite database (file is not a database)" in line


@pytest.mark.parametrize("cli", [train, tune])
def test_a_store_mlflow_cannot_upgrade_is_refused_once_ray_is_up_and_that_ray_is_stopped(capsys, monkeypatch, base,
                                                                                           tmp_path, cli):
    """An SQLite store that passes the probe but that MLflow cannot open (a schema revision it does not know, as a
    newer MLflow leaves) is found while Ray starts (``launch.start_ray`` opens the store meanwhile): one line, exit 2,
    and the Ray that command started is stopped before it returns."""
    import sqlite3
    from platform import launch

    import ray

    db = tmp_path / "newer.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    conn.close()
    events: list[str] = []
    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: events.append("ray started") or True)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: events.append("ray stopped"))
    rc = cli.main(with_flag(base, "--tracking-uri", f"sqlite:///{db}"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: MLflow cannot open the tracking store sqlite:///{db} (Can't locate revision identified "
                      "by 'ffffffffffff'); pass another --tracking-uri"], err
    assert events == ["ray started", "ray stopped"]


@pytest.mark.parametrize("flag", ["--cache-dir", "--storage-path"])
def test_unwritable_folder(capsys, base, tmp_path, flag):
    (tmp_path / "a-file").write_text("")
    line, _ = refused(capsys, with_flag(base, flag, str(tmp_path / "a-file" / "sub")))
    assert f"cannot write to {flag} {tmp_path / 'a-file' / 'sub'} (Not a directory); pass a writable folder" in line
    if os.geteuid() != 0:  # root writes anywhere: only a non-root run can test permissions
        (tmp_path / "locked").mkdir(mode=0o500)
        line, _ = refused(capsys, with_flag(base, flag, str(tmp_path / "locked")))
        assert "(Permission denied)" in line


# -- during training ---------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_nan_loss_fails_its_trial_with_the_reason_and_the_sweep_goes_on(ray_session, base, feature_cache, tmp_path,
                                                                       capsys):
    """lr 1e20 makes the context explode within the first epoch: that trial ends FAILED with the reason (no retry
    repeats the divergence), the other trial finishes and is registered."""
    import io
    from contextlib import redirect_stdout

    from mlflow.tracking import MlflowClient

    argv = [*with_flag(with_flag(base, "--cache-dir", str(feature_cache)), "--epochs", "2"), "--batch-size", "8",
            "--n-views", "1", "--max-test-items", "20", "--grid", "train.lr=0.002,1e20", "--warmup-epochs", "0",
            "--sweep-name", "nan", "--json"]
    out = io.StringIO()
    with redirect_stdout(out):
        rc = tune.main(argv)
    lines = out.getvalue().strip().splitlines()
    assert rc == 0, "\n".join(lines[-20:])
    summary = json.loads(lines[-1])
    assert summary["trials"] == 2 and summary["trials_errored"] == 1 and summary["trials_finished"] == 1
    assert summary["best_config"]["train.lr"] == 0.002 and summary["registered_version"] == 1
    assert "failed: training diverged: the loss gradient became nan at epoch 1" in out.getvalue()  # the report
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    by_lr = {float(c.data.params["train.lr"]): c for c in children}
    assert by_lr[1e20].info.status == "FAILED" and by_lr[0.002].info.status == "FINISHED"
    assert by_lr[1e20].data.tags["coop.failure"].startswith("training diverged: the loss gradient became nan at "
                                                            "epoch 1, step ")
    assert "lower the learning rate (--lr)" in by_lr[1e20].data.tags["coop.failure"]
    assert client.get_metric_history(by_lr[1e20].info.run_id, "val_acc") == []  # it never finished an epoch


@pytest.mark.ray
def test_nan_loss_ends_a_train_run_failed_with_one_line(ray_session, base, feature_cache, tmp_path, capsys):
    """``platform.train`` (a Ray Train run) that diverges: exit 2, one error line with the reason, run FAILED."""
    from mlflow.tracking import MlflowClient

    argv = [*with_flag(with_flag(base, "--cache-dir", str(feature_cache)), "--lr", "1e20"), "--batch-size", "8",
            "--n-views", "1", "--max-test-items", "20", "--warmup-epochs", "0", "--max-failures", "2"]
    rc = train.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert line.startswith("error: training diverged: the loss gradient became nan at epoch 1, step ")
    run_id = line.rsplit("MLflow run ", 1)[1].split()[0]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["coop.failure"].startswith("training diverged")
    assert err.count("training diverged") <= 3  # reported once, not retried max-failures times


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--grace-period", "0", "--grace-period must be >= 1 (epochs every trial runs before ASHA may stop it), got 0"),
    ("--reduction-factor", "0", "--reduction-factor must be > 1 (ASHA keeps the top 1/factor of trials at each "
                                "rung), got 0.0"),
    ("--reduction-factor", "1", "--reduction-factor must be > 1"),
    ("--max-concurrent", "0", "--max-concurrent must be >= 1, got 0"),
    ("--gpus-per-trial", "-1", "--gpus-per-trial must be in (0, 1] (a share of one GPU per trial), got -1.0"),
    ("--num-samples", "0", "--num-samples must be >= 1, got 0"),
    ("--max-failures", "-1", "--max-failures must be >= 0, got -1"),
])
def test_sweep_settings_out_of_range_are_refused_before_ray_starts(capsys, monkeypatch, base, tmp_path, flag, value,
                                                                   message):
    forbid_ray_start(monkeypatch)
    line, _ = refused(capsys, with_flag(base, flag, value), cli=tune)
    assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "ray").exists()  # no sweep folder left behind
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run opened (and left RUNNING)


@pytest.mark.parametrize("flags", [("--method", "kgcoop"), ("--method", "coop", "cocoop"),
                                   ("--grid", "method.name=coop,prograd")], ids=["flag", "searched", "grid"])
def test_packing_another_method_than_coop_is_refused_before_ray_starts(capsys, monkeypatch, base, tmp_path, flags):
    """However a sweep's trials get a method (the flag, a searched choice, a grid field), packs refuse all but CoOp:
    a pack's shared text step would silently train them as CoOp."""
    forbid_ray_start(monkeypatch)
    line, _ = refused(capsys, [*base, "--pack-size", "2", *flags], cli=tune)
    assert line.startswith("error: --pack-size 2: packs train CoOp configurations only"), line
    assert "use --pack-size 1 to train" in line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


# -- the rows of issue 20: refused before Ray starts, like every other row --------------------------------------------


@pytest.mark.parametrize("cli", ["train", "tune", "study", "evaluate"])
def test_tracking_uri_with_a_scheme_mlflow_has_no_store_for(capsys, base, tmp_path, cli):
    argv = with_flag(base, "--tracking-uri", "foo://bar")
    if cli == "evaluate":
        argv = ["--model", str(tmp_path / "prompts.safetensors"), "--dataset", "eurosat", "--tracking-uri", "foo://bar"]
    line, _ = refused(capsys, argv, cli={"train": train, "tune": tune, "study": study, "evaluate": evaluate}[cli])
    assert line.startswith("error: --tracking-uri foo://bar: MLflow has no tracking store for the scheme 'foo' (it "
                           "opens file://, sqlite://"), line
    assert "pass e.g. sqlite:///mlflow.db" in line
    assert not (tmp_path / "ray").exists()


def _shots(argv: list[str], *values: str) -> list[str]:
    i = argv.index("--shots")
    return [*argv[:i], *argv[i + 2:], "--shots", *values]


def test_a_study_checks_every_shot_count_against_the_smallest_class(capsys, base, tmp_path):
    # The small root has 8 training images per class: 2 shots fit, 100 do not, and no trial may find out.
    line, _ = refused(capsys, [*_shots(base, "2", "100"), "--seeds", "1"], cli=study)
    assert line.startswith("error: shots 100 is more than the smallest class has: 'Annual Crop Land' has 8 training "
                           "images in eurosat; use shots <= 8"), line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_grid_over_shots_is_checked_value_by_value_and_the_flag_it_overrides_is_not(capsys, base, tmp_path):
    line, _ = refused(capsys, [*_shots(base, "64"), "--grid", "train.shots=2,100"], cli=tune)
    assert line.startswith("error: shots 100 is more than the smallest class has"), line
    # Every grid value fits: the --shots 64 that the grid replaces is no trial's, so it is not held against the data
    # (the sweep gets past every check and would start Ray, which this test forbids).
    with pytest.MonkeyPatch.context() as patch:
        forbid_ray_start(patch)
        with pytest.raises(AssertionError, match="Ray was started"):
            tune.main([*_shots(base, "64"), "--grid", "train.shots=2,4"])
    capsys.readouterr()


def _folder(tmp_path: Path, shared_data: Path, classes: dict[str, int], empty: str | None = None) -> Path:
    """A class-per-folder dataset of real EuroSAT images (``classes``: EuroSAT folder -> images), with ``empty`` a
    class of zero-byte ``.jpg`` files."""
    root = tmp_path / "my_land"
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for src in sorted((shared_data / "eurosat" / "2750" / name).iterdir())[:n]:
            shutil.copy(src, root / name / src.name)
    if empty is not None:
        (root / empty).mkdir()
        for i in range(10):
            (root / empty / f"{empty}_{i}.jpg").write_bytes(b"")
    return root


def test_a_class_whose_images_are_all_unreadable_is_named(capsys, base, tmp_path, shared_data):
    folder = _folder(tmp_path, shared_data, {"Forest": 10, "River": 10}, empty="Broken")
    line, _ = refused(capsys, _shots(with_flag(base, "--dataset", str(folder)), "2"))
    assert line.startswith("error: class 'Broken' of my_land: none of its 2 training images the run uses opens as an "
                           "image (first: "), line
    assert "empty files or not images" in line and "replace its images, or remove the class" in line


def test_a_dataset_of_one_class(capsys, base, tmp_path, shared_data):
    folder = _folder(tmp_path, shared_data, {"Forest": 10})
    line, _ = refused(capsys, with_flag(base, "--dataset", str(folder)))
    assert line.startswith("error: my_land has 1 class ('Forest'): CoOp classifies an image as the class whose prompt "
                           "matches it best, so it needs at least 2"), line


def test_the_printed_resume_command_names_the_dataset_as_the_cli_takes_it(tmp_path, shared_data, small_eurosat_root):
    """The ``--resume`` command a sweep prints (interrupted, or MLflow gone) parses back, through the same CLI, to
    the sweep's own dataset: your folder by its path and name, a built-in dataset by key and data root; a study's
    command is ``platform.study``'s, with its protocol and targets."""
    from platform.cli import dataset_ref_from_args, parse_run_args
    from platform.run_spec import DatasetRef, RunSpec
    from platform.sweep.state import SweepState, resume_command

    from coop_core.datasets import folder_source

    folder = _folder(tmp_path, shared_data, {"Forest": 4, "River": 4})
    own = DatasetRef("my_land", folder_source(folder, name="my_land"))
    builtin = DatasetRef("eurosat")
    for ref, kind, flags in ((own, "sweep", ()), (builtin, "sweep", ()), (own, "study", ("--protocol", "base2new")),
                             (builtin, "study", ("--protocol", "cross", "--targets", str(folder)))):
        spec = RunSpec(dataset=ref.name, source=ref.source, data_root=str(small_eurosat_root))
        state = SweepState(dataset=ref.name, base_spec=spec.to_dict(), parent_run_id="p", tracking_uri="sqlite:///x.db",
                           experiment="e", experiment_id="1", started_at=0.0, num_samples=1, search_seed=1, epochs=1,
                           trial_runner="in-process", gpus_per_trial=0.0, max_failures=2, kind=kind,
                           entry_point=f"platform.{'study' if kind == 'study' else 'tune'}", resume_flags=flags)
        assert SweepState.from_dict(json.loads(json.dumps(state.to_dict()))) == state  # as the state file holds it
        argv = shlex.split(resume_command(state, "sweep-my_land-1", str(tmp_path / "ray dir")))
        assert argv[:3] == ["python", "-m", state.entry_point]
        cli = study if kind == "study" else tune
        args = parse_run_args(cli.build_parser(), argv[3:])
        assert args.resume and args.sweep_name == "sweep-my_land-1" and args.storage_path == str(tmp_path / "ray dir")
        resolved = dataset_ref_from_args(args, args.dataset[0] if kind == "study" else None)
        assert resolved == ref, argv
        if kind == "study":
            assert args.protocol == flags[1] and (args.targets or []) == list(flags[3:])


def test_a_study_of_one_seed_shows_no_spread_it_did_not_measure():
    """One seed has no standard deviation: the table says "(n=1)", not "± 0.00"; the average over datasets of a
    several-seed study is the spread of the per-seed averages, not an average of deviations."""
    def row(seed: int, test: float, zeroshot: float) -> dict:
        return {"finished": True, "config": {"train.shots": 16, "train.seed": seed},
                "last_result": {"test_acc": test, "zeroshot_test_acc": zeroshot}}

    one = study.study_results([row(1, 61.25, 40.0)], "fewshot", "eurosat", [])
    assert one["cells"][0]["coop_std"] is None
    table = study.format_table(one)
    assert "61.25 (n=1)" in table and "±" not in table.split("\n", 1)[1]
    a = study.study_results([row(1, 60.0, 40.0), row(2, 70.0, 40.0)], "fewshot", "a", [])
    b = study.study_results([row(1, 80.0, 50.0), row(2, 50.0, 50.0)], "fewshot", "b", [])
    average = study.combine([a, b], "fewshot")["cells"][-1]
    assert average["dataset"] == "average" and average["coop_per_seed"] == {"1": 70.0, "2": 60.0}
    assert average["coop_std"] == pytest.approx(7.0710678)  # stdev(70, 60); the datasets' own: 7.07 and 21.2
