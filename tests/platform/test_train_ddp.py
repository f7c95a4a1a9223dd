"""Ray Train DDP: two workers take the one-process steps, a lost worker resumes from the last checkpoint, and the CLI
tracks the whole run in MLflow. Real EuroSAT images (a small slice), the tiny ViT backbone, cached features, gloo.

One CLI run (2 workers, rank 1's process SIGKILLed once after epoch 2) is compared with the same run done by
``coop_core`` in this process without Ray; Ray Train worker start-up (~30 s per worker group on 2 cores) makes more runs
too slow."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import time
from pathlib import Path
from platform import tracking
from platform import train as platform_train
from platform.artifacts import TRAIN_STATE_FILE
from platform.run_spec import RunSpec, subset_test_items
from platform.train import main

import faults
import pytest
import torch
from numerics import TRAJECTORY, assert_reordered, assert_reordered_scalar

from coop_core.config import ModelConfig, PromptConfig, TrainConfig

EPOCHS = 3


def _spec(root: Path, cache: Path, backbone: str, num_workers: int) -> RunSpec:
    # 2 shots x 10 classes = 20 training items -> two global batches of 8 per epoch (the partial one is dropped);
    # with 2 workers each step is two shards of 4. lr is raised so that 6 steps move the context far.
    return RunSpec(
        dataset="eurosat",
        data_root=str(root),
        model=ModelConfig(backbone=backbone, pretrained="none"),
        prompt=PromptConfig(n_ctx=4),
        train=TrainConfig(shots=2, seed=3, epochs=EPOCHS, batch_size=8, lr=0.5, warmup_epochs=0, n_views=2),
        num_workers=num_workers,
        cache_dir=str(cache),
        max_test_items=30,
    )


def _cli_argv(root: Path, cache: Path, backbone: str, num_workers: int) -> list[str]:
    """The CLI flags of ``_spec(root, cache, backbone, num_workers)``."""
    return ["--dataset", "eurosat", "--data-root", str(root), "--backbone", backbone, "--pretrained", "none",
            "--n-ctx", "4", "--shots", "2", "--seed", "3", "--epochs", str(EPOCHS), "--batch-size", "8", "--lr", "0.5",
            "--warmup-epochs", "0", "--n-views", "2", "--num-workers", str(num_workers), "--use-gpu", "auto",
            "--max-test-items", "30", "--cache-dir", str(cache)]


@pytest.fixture(scope="module")
def cli_run(ray_session, small_eurosat_root, feature_cache, tiny_vit_config, tmp_path_factory) -> dict:
    """``python -m platform.train ... --num-workers 2 --json``, in-process, where rank 1's worker process is SIGKILLed
    once after epoch 2 (a lost machine, an OOM kill: no Python exception, no clean shutdown).

    Ray Train worker start-up costs ~30 s per group on 2 cores, so this one run serves every Ray test: DDP
    equivalence, fault recovery and MLflow tracking of a run that survived a lost worker.
    """
    tmp = tmp_path_factory.mktemp("cli")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    flag = tmp / "failed-once"
    argv = [*_cli_argv(small_eurosat_root, feature_cache, tiny_vit_config, 2), "--storage-path",
            str(tmp / "ray_results"), "--tracking-uri", uri, "--max-failures", "1", "--json"]
    faults.picklable()
    # Ray Train's controller collects the workers' reports every 2 s; epochs here take milliseconds. Rank 1 waits 8 s
    # before dying (rank 0 waits for it at the next all-reduce), so epoch 2's checkpoint is registered first.
    fail_once = faults.FailOnce(epoch=2, rank=1, flag_file=str(flag), kill=True, delay_s=8.0)
    out = io.StringIO()
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        failing_once = functools.partial(platform_train.build_trainer, epoch_hooks=[fail_once])
        mp.setattr(platform_train, "build_trainer", failing_once)
        rc = main(argv)
    wall_s = time.perf_counter() - t0
    assert rc == 0
    lines = out.getvalue().strip().splitlines()
    summary = json.loads(lines[-1])
    d = Path(summary["checkpoint"])
    state = torch.load(d / TRAIN_STATE_FILE, weights_only=True)
    return {
        "lines": lines, "summary": summary, "uri": uri, "tmp": tmp, "flag": flag, "wall_s": wall_s,
        "ctx": state["ctx"], "epoch": state["epoch"], "files": sorted(p.name for p in d.iterdir()),
        "history": json.loads((d / "history.json").read_text()),
        "config": json.loads((d / "config.json").read_text()),
        "metrics": json.loads((d / "metrics.json").read_text()),
    }


def _reference_run(root: Path, cache: Path) -> dict:
    """The run of ``_spec`` in this process with ``coop_core`` alone: one process, no Ray, never interrupted."""
    import dataclasses as dc

    from coop_core.backbone import load_clip
    from coop_core.datasets import load_dataset
    from coop_core.engine import evaluate, train
    from coop_core.fewshot import build_few_shot
    from coop_core.pipeline import build_model, prepare_features

    clip = load_clip(str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-vit.json"), "none")
    spec = _spec(root, cache, "unused", 1)
    splits = load_dataset("eurosat", root)
    splits = dc.replace(splits, test=subset_test_items(splits.test, spec.max_test_items))
    fewshot = build_few_shot(splits, spec.train.shots, spec.train.seed, cache)
    feats = prepare_features(clip, splits, fewshot, spec.train, cache_dir=cache)
    model = build_model(clip, splits.classnames, spec.prompt, spec.train.seed)
    initial = model.prompt_learner.ctx.detach().clone()
    history = train(model, feats.train, spec.train, val=feats.val)
    return {"initial_ctx": initial, "ctx": model.prompt_learner.ctx.detach().clone(), "history": history,
            "test_acc": evaluate(model, feats.test)["acc"]}


@pytest.fixture(scope="module")
def reference(small_eurosat_root, feature_cache) -> dict:
    return _reference_run(small_eurosat_root, feature_cache)


# -- RunSpec: what the tune engineer builds trials from ------------------------------------------------------


def test_run_spec_round_trips_and_overrides(tmp_path):
    spec = _spec(tmp_path, tmp_path / "cache", "tests/fixtures/tiny-vit.json", 2)
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    changed = spec.with_overrides({"train.lr": 0.01, "n_ctx": 8, "class_token_position": "front", "num_workers": 1})
    assert (changed.train.lr, changed.prompt.n_ctx, changed.prompt.class_token_position, changed.num_workers) == (
        0.01, 8, "front", 1)
    assert changed.train.batch_size == spec.train.batch_size  # untouched fields stay
    assert spec.with_overrides({"train.loader_workers": 3}).train.loader_workers == 3  # data loaders, not Ray workers
    with pytest.raises(ValueError, match="unknown override 'train.num_workers'"):
        spec.with_overrides({"train.num_workers": 3})  # one meaning per name: num_workers is Ray workers only
    with pytest.raises(ValueError, match="unknown override 'nope'"):
        spec.with_overrides({"nope": 1})
    with pytest.raises(ValueError, match="n_ctx"):
        spec.with_overrides({"prompt.n_ctx": 0})  # the core configs validate
    with pytest.raises(ValueError, match="unknown dataset"):
        dataclasses.replace(spec, dataset="mnist")
    with pytest.raises(ValueError, match="unknown RunSpec keys"):
        RunSpec.from_dict(spec.to_dict() | {"lr": 1})


def test_test_subset_is_deterministic_and_class_balanced(small_eurosat_root):
    from coop_core.datasets import load_dataset

    test = load_dataset("eurosat", small_eurosat_root).test  # 6 per class
    subset = subset_test_items(test, 30)
    assert subset == subset_test_items(tuple(reversed(test)), 30)
    counts = {label: sum(it.label == label for it in subset) for label in range(10)}
    assert set(counts.values()) == {3}
    assert subset_test_items(test, None) == tuple(test)


def test_flatten_params_uses_dotted_config_keys(tmp_path):
    params = tracking.flatten_params(_spec(tmp_path, tmp_path, "tiny.json", 2))
    assert params["prompt.n_ctx"] == "4"
    assert params["train.lr"] == "0.5"
    assert params["train.epochs"] == str(EPOCHS)
    assert params["model.pretrained"] == "none"
    assert params["dataset"] == "eurosat" and params["shots"] == "2" and params["seed"] == "3"
    assert params["num_workers"] == "2"


# -- Ray Train -----------------------------------------------------------------------------------------------


@pytest.mark.long
@pytest.mark.numeric
@pytest.mark.ray
def test_two_workers_take_the_one_process_steps(cli_run, reference):
    assert cli_run["config"]["world_size"] == 2 and cli_run["epoch"] == EPOCHS
    # Training moved the context far more than the tolerance, and DDP moved it exactly as one process does.
    assert (reference["ctx"] - reference["initial_ctx"]).abs().max() > 0.1 * reference["ctx"].abs().max()
    assert_reordered(cli_run["ctx"], reference["ctx"], TRAJECTORY, "2-worker DDP context vs one process")
    # Same global-batch metrics every epoch (loss and accuracy are all-reduced over the shards).
    for ours, ref in zip(cli_run["history"], reference["history"], strict=True):
        assert ours["epoch"] == ref["epoch"]
        assert_reordered_scalar(ours["train_loss"], ref["train_loss"], TRAJECTORY, "epoch loss")
        assert ours["train_acc"] == pytest.approx(ref["train_acc"])
        assert ours["val_acc"] == pytest.approx(ref["val_acc"])
    final = cli_run["metrics"]
    assert final["test_acc"] == pytest.approx(reference["test_acc"])
    for key in ("test_macro_f1", "zeroshot_test_acc", "zeroshot_test_macro_f1", "val_acc"):
        assert 0.0 <= final[key] <= 100.0
    assert {"prompts.safetensors", "prompts.safetensors.json", "nearest_words.txt", "config.json",
            "history.json", "state.pt", "metrics.json"} <= set(cli_run["files"])


@pytest.mark.long
@pytest.mark.numeric
@pytest.mark.ray
def test_lost_worker_resumes_from_the_last_checkpoint(cli_run, reference):
    from mlflow.tracking import MlflowClient

    note = cli_run["flag"].read_text()
    assert note.startswith("failed at epoch 2 on rank 1")  # the failure really happened ...
    pid = int(note.rsplit("pid ", 1)[1].rstrip(")\n"))
    with pytest.raises(ProcessLookupError):  # ... to a worker process that is gone (SIGKILL)
        os.kill(pid, 0)
    assert cli_run["config"]["resumed_from_epoch"] == 2  # the new worker group started from epoch 2's checkpoint
    assert [row["epoch"] for row in cli_run["history"]] == [1, 2, 3]  # no epoch lost or repeated
    assert_reordered(cli_run["ctx"], reference["ctx"], TRAJECTORY, "resumed DDP context")  # as if nothing had failed
    client = MlflowClient(cli_run["uri"])
    steps = [m.step for m in client.get_metric_history(cli_run["summary"]["run_id"], "val_acc")]
    assert steps == [1, 2, 3]


@pytest.mark.long
@pytest.mark.ray
def test_cli_json_and_mlflow_run(cli_run, small_eurosat_root, feature_cache, tiny_vit_config):
    from mlflow.tracking import MlflowClient

    from coop_core.prompts_io import load_prompts

    summary, tmp = cli_run["summary"], cli_run["tmp"]
    assert summary["val_acc"] == pytest.approx(cli_run["metrics"]["val_acc"])
    assert "test (zero-shot)" in "\n".join(cli_run["lines"][:-1])  # the human table comes before the JSON line
    assert summary["experiment"] == "coop-eurosat" and summary["num_workers"] == 2 and not summary["use_gpu"]
    assert summary["ui_command"] == f"mlflow ui --host 127.0.0.1 --backend-store-uri {cli_run['uri']}"
    # The flags resolved to exactly the spec the other tests train.
    expected = _spec(small_eurosat_root, feature_cache, tiny_vit_config, 2).resolved_config()
    config = cli_run["config"]
    assert {k: config[k] for k in expected} == expected

    client = MlflowClient(cli_run["uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["dataset"], params["shots"], params["seed"], params["prompt.n_ctx"], params["train.epochs"]) == (
        "eurosat", "2", "3", "4", str(EPOCHS))
    assert params["model.backbone"] == tiny_vit_config and params["train.lr"] == "0.5"
    # 10 classes: the text step is small next to the model, so "auto" kept every worker on the whole class list.
    assert params["train.text_sharding"] == "auto" and params["train.text_sharding_used"] == "data"
    assert summary["text_sharding"] == "data"
    for key in ("train_loss", "train_acc", "lr", "val_acc", "val_macro_f1"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
        assert [m.value for m in history] == pytest.approx([row[key] for row in cli_run["history"]])
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    assert run.data.metrics["zeroshot_test_acc"] == pytest.approx(summary["zeroshot_test_acc"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [EPOCHS]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"prompts", "config.json", "nearest_words.txt", "history.json", "metrics.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "prompts")} == {
        "prompts/prompts.safetensors", "prompts/prompts.safetensors.json"}
    local = client.download_artifacts(run.info.run_id, "prompts/prompts.safetensors", str(tmp / "dl"))
    ctx, meta = load_prompts(local)
    assert torch.equal(ctx, cli_run["ctx"])  # the same tensor, through a safetensors file
    assert len(meta.classnames) == 10 and meta.backbone == tiny_vit_config and meta.prompt.n_ctx == 4
    words = Path(client.download_artifacts(run.info.run_id, "nearest_words.txt", str(tmp / "dl"))).read_text()
    assert len(words.strip().splitlines()) == 1 + 4  # header + one row per context vector
    # Artifacts of a SQLite store live beside the database, not in the working directory.
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp)


# -- CLI failures: one line, exit 2, before Ray starts -----------------------------------------------------------


def _cli_base(tmp_path: Path, tiny_vit_config: str) -> list[str]:
    return ["--dataset", "eurosat", "--backbone", tiny_vit_config, "--shots", "2", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_cli_missing_data_exits_2_with_a_message(tmp_path, tiny_vit_config, capsys):
    rc = main([*_cli_base(tmp_path, tiny_vit_config), "--pretrained", "none", "--data-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: dataset 'eurosat' not found") and "--download" in err
    assert "Traceback" not in err


def test_cli_offline_weights_fail_fast_with_one_line(tmp_path, small_eurosat_root, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants as hub

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)  # no network, even where CI has one
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # and nothing cached
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)  # restored afterwards
    t0 = time.perf_counter()
    rc = main(["--dataset", "eurosat", "--data-root", str(small_eurosat_root), "--backbone", "RN50",
               "--pretrained", "openai", "--shots", "2", "--cache-dir", str(tmp_path / "cache"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray")])
    err = capsys.readouterr().err
    assert rc == 2
    assert time.perf_counter() - t0 < 2  # measured 0.16 s in-process, not huggingface_hub's minute of retries
    assert err.count("\n") == 1 and err.startswith("error: cannot download pretrained weights RN50/openai")
    # Not "--pretrained none" for RN50 (a random RN50 encoding every image on the CPU, for nothing): the README's
    # offline smoke run, the tests' tiny backbone.
    assert "or, to try the platform offline, add --backbone tests/fixtures/tiny-vit.json --pretrained none" in err


def test_cli_missing_checkpoint_file_exits_2(tmp_path, small_eurosat_root, tiny_vit_config, capsys):
    rc = main([*_cli_base(tmp_path, tiny_vit_config), "--data-root", str(small_eurosat_root),
               "--pretrained", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "checkpoint file not found" in err
