"""The CLIs' shared flags: ``--preset`` gives defaults that explicit flags override, and ``--dataset`` is a registry
key or a path to the user's own images."""

from __future__ import annotations

import os
from platform import study, train, tune
from platform.cli import dataset_ref, parse_run_args, spec_from_args

import pytest


@pytest.mark.parametrize("cli", [train, tune, study])
def test_a_preset_sets_the_defaults(cli):
    args = parse_run_args(cli.build_parser(), ["--dataset", "eurosat", "--preset", "coop_vit_b16_ctxv1"])
    assert (args.backbone, args.pretrained) == ("ViT-B-16", "openai")
    assert (args.n_ctx, args.ctx_init, args.csc, args.class_token_position) == (4, "a photo of a", False, "end")
    assert args.epochs == 200


@pytest.mark.parametrize("cli", [train, tune, study])
def test_a_method_preset_sets_the_method_and_its_settings(cli):
    """A run takes one ``--method``, a sweep or study a list of them: the preset's method arrives in the flag's form."""
    args = parse_run_args(cli.build_parser(), ["--dataset", "eurosat", "--preset", "prograd_rn50_eurosat"])
    assert args.method == ("prograd" if cli is train else ["prograd"])
    assert (args.prograd_lambda, args.prograd_temperature, args.pad_ctx_init, args.n_ctx) == (1.0, 1.0, True, 16)
    several = {"ref": dataset_ref("eurosat"), "shots": 16, "seed": 1} if cli is study else {}  # a study's lists
    spec = spec_from_args(args, use_gpu=False, **several)
    assert spec.method.name == "prograd" and spec.prompt.ctx_init == "a centered satellite photo of"


def test_flags_given_explicitly_win_over_the_preset():
    args = parse_run_args(train.build_parser(), ["--dataset", "eurosat", "--epochs", "3", "--preset",
                                                 "coop_rn50_imagenet", "--n-ctx", "8", "--csc"])
    assert args.backbone == "RN50" and args.epochs == 3 and args.n_ctx == 8 and args.csc is True
    spec = spec_from_args(args, use_gpu=False)
    assert spec.prompt.n_ctx == 8 and spec.train.resolved_epochs == 3


def test_without_a_preset_the_defaults_are_coops():
    args = parse_run_args(train.build_parser(), ["--dataset", "eurosat"])
    assert args.preset is None and args.n_ctx == 16 and args.epochs is None and args.backbone == "ViT-B-16"


def test_a_study_takes_several_shot_counts_and_seeds():
    args = parse_run_args(study.build_parser(), ["--dataset", "eurosat", "--shots", "1", "4", "all"])
    assert args.shots == [1, 4, "all"] and args.seeds == [1, 2, 3] and args.protocol == "fewshot"


def test_dataset_is_a_registry_key_or_a_path(tmp_path, shared_data):
    ref = dataset_ref("eurosat", classes="new")
    assert ref.source is None and ref.label == "eurosat.new"
    folder = tmp_path / "My Land-Cover"
    for name in ("forest", "river"):
        (folder / name).mkdir(parents=True)
        for i in range(1, 4):
            os.symlink(shared_data / "eurosat" / "2750" / name.capitalize() / f"{name.capitalize()}_{i}.jpg",
                       folder / name / f"{i}.jpg")
    ref = dataset_ref(str(folder), template="a satellite photo of {}.")
    assert ref.name == "my_land_cover" and ref.source.path == str(folder.resolve())
    assert ref.source.template == "a satellite photo of {}."
    with pytest.raises(ValueError, match="--dataset-name, --template apply to your own data"):
        dataset_ref("eurosat", name="mine", template="a {}.")


def test_a_grid_over_shots_follows_coops_epochs_by_shots_unless_epochs_is_given():
    from platform.sweep.plan import grid_epochs
    from platform.trials import trial_spec

    spec = spec_from_args(parse_run_args(train.build_parser(), ["--dataset", "eurosat", "--shots", "1"]),
                          use_gpu=False)
    assert [trial_spec(spec.to_dict(), {"train.shots": k}).train.resolved_epochs for k in (1, 2, 4, 8, 16)] == [
        50, 100, 100, 200, 200]
    assert grid_epochs(spec, {"train.shots": [1, 4]}) == 100 and grid_epochs(spec, {"train.seed": [1, 2]}) == 50
    fixed = spec.with_overrides({"train.epochs": 3})
    assert grid_epochs(fixed, {"train.shots": [1, 16]}) == 3


def test_a_command_ends_with_its_status_once_thread_pools_and_atexit_work_are_done(tmp_path):
    """``run_command`` ends the process with ``os._exit`` (no interpreter teardown) only after what the interpreter
    would finish first: a thread pool's queued work (MLflow uploads artifacts from one), then ``atexit`` handlers."""
    import subprocess
    import sys

    done = tmp_path / "done"
    code = f"""
import atexit, sys, time
from concurrent.futures import ThreadPoolExecutor
from platform.cli import run_command
pool = ThreadPoolExecutor(1)
def main():
    pool.submit(time.sleep, 0.3)
    pool.submit(lambda: open({str(done / 'pool')!r}, "w").write("x"))
    atexit.register(lambda: open({str(done / 'atexit')!r}, "w").write("x"))
    print("out", end="")  # unflushed output is written too
    return 3
run_command(main)
"""
    done.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and result.stdout == "out", result.stderr
    assert (done / "pool").exists() and (done / "atexit").exists()
