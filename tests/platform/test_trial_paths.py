"""The two trial paths of a sweep: single-worker trials in their own Tune process, multi-worker trials as Ray Train
runs. Their resources and validation, where a trial's time goes, a killed trial process retried from its checkpoint
(in-process path), and a multi-worker sweep whose ASHA-stopped trials leave no placement group or actor behind."""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path
from platform import tune
from platform.run_spec import RunSpec
from platform.sweep import plan
from platform.sweep import run as sweep_run
from platform.sweep.trial_runs import trial_timing
from platform.tracking import TRIAL_TAG

import faults
import pytest
import torch

from coop_core.config import ModelConfig, TrainConfig
from coop_core.prompts_io import load_prompts


def _spec(tmp_path: Path, **kw) -> RunSpec:
    return RunSpec(dataset="eurosat", data_root=str(tmp_path), model=ModelConfig(backbone="x.json", pretrained="none"),
                   train=TrainConfig(shots=2, epochs=2), cache_dir=str(tmp_path), **kw)


# -- choosing the path and its resources ---------------------------------------------------------------------------


def test_one_worker_trials_run_in_process_and_ddp_trials_through_ray_train(tmp_path):
    one, two = _spec(tmp_path), _spec(tmp_path, num_workers=2)
    assert plan.resolve_trial_runner("auto", one) == "in-process"
    assert plan.resolve_trial_runner("auto", two) == "ray-train"
    assert plan.resolve_trial_runner("ray-train", one) == "ray-train"  # forced, e.g. to compare
    with pytest.raises(ValueError, match="in-process runs one worker per trial"):
        plan.resolve_trial_runner("in-process", two)
    with pytest.raises(ValueError, match="--trial-runner must be one of"):
        plan.resolve_trial_runner("threads", one)


def test_gpu_share_is_validated_and_sets_how_many_trials_fit(tmp_path):
    gpu_one = _spec(tmp_path, use_gpu=True)
    gpu_two = _spec(tmp_path, use_gpu=True, num_workers=2)
    assert plan.validate_gpus_per_trial(0.25, gpu_one, "in-process") == 0.25
    assert plan.validate_gpus_per_trial(0.25, _spec(tmp_path), "in-process") == 0.0  # ignored on CPUs
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            plan.validate_gpus_per_trial(bad, gpu_one, "in-process")
    with pytest.raises(ValueError, match="NCCL cannot place two ranks on one GPU"):
        plan.validate_gpus_per_trial(0.5, gpu_two, "ray-train")
    cluster = {"CPU": 16.0, "GPU": 2.0}
    assert plan.resolve_max_concurrent(None, gpu_one, cluster, 0.25) == 8  # 4 trials per GPU
    assert plan.resolve_max_concurrent(None, gpu_one, cluster, 1.0) == 2
    assert plan.resolve_max_concurrent(None, gpu_two, cluster, 1.0) == 1
    assert plan.resolve_max_concurrent(None, _spec(tmp_path, cpus_per_worker=4), cluster, 0.0) == 4  # CPU-bound
    with pytest.raises(ValueError, match="more than the Ray cluster has"):
        plan.resolve_max_concurrent(None, gpu_one, {"CPU": 4.0}, 0.5)


def test_grid_values_take_the_field_types_and_are_validated(tmp_path):
    spec = _spec(tmp_path)
    grid = plan.parse_grid(["prompt.n_ctx=4,8", "prompt.csc=true,false", "train.lr=0.002,1e-3",
                            "prompt.class_token_position=end,front", "train.epochs=3"], spec)
    assert grid == {"prompt.n_ctx": [4, 8], "prompt.csc": [True, False], "train.lr": [0.002, 0.001],
                    "prompt.class_token_position": ["end", "front"], "train.epochs": [3]}
    for bad, message in (("prompt.n_ctx=four", "'four' is not a valid int"), ("n_ctx=4", "expected FIELD=V1,V2"),
                         ("prompt.depth=2", "prompt has no field 'depth'"), ("prompt.n_ctx=0", "n_ctx must be"),
                         ("prompt.csc=yes", "not a valid bool"), ("prompt.n_ctx=4,4", "repeated values")):
        with pytest.raises(ValueError, match=message):
            plan.parse_grid([bad], spec)


def test_trial_timing_splits_a_trials_wall_time():
    last = {"entered_at": 110.0, "process_created_at": 104.0, "time_train_loop_s": 3.0, "time_eval_s": 1.0}
    t = trial_timing(last, created_at=100.0, ended_at=120.0, tracking_s=0.5)
    # created 100 -> process up 104 (queue 4) -> our code runs at 110 (start-up 6) -> ends 120 (wall 20)
    assert t == pytest.approx({"time_queue_s": 4.0, "time_process_start_s": 6.0, "time_tracking_s": 0.5,
                               "time_trial_wall_s": 20.0, "time_overhead_s": 16.0, "overhead_share": 0.8})
    warm_reused = trial_timing({k: v for k, v in last.items() if k != "process_created_at"}, created_at=100.0,
                               ended_at=120.0, tracking_s=0.0)
    assert warm_reused["time_process_start_s"] == 0.0 and warm_reused["time_queue_s"] == 10.0  # a reused process
    assert warm_reused["time_trial_wall_s"] == 20.0
    assert trial_timing(last, created_at=None, ended_at=120.0, tracking_s=1.0) == {"time_tracking_s": 1.0}


# -- on a local Ray ---------------------------------------------------------------------------------------------------


def _common(root: Path, cache: Path, backbone: str, tmp: Path, name: str) -> list[str]:
    return ["--dataset", "eurosat", "--data-root", str(root), "--backbone", backbone, "--pretrained", "none",
            "--shots", "2", "--batch-size", "8", "--n-views", "2", "--max-test-items", "30", "--cache-dir", str(cache),
            "--storage-path", str(tmp / "ray"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--sweep-name", name, "--json"]


def _run(argv: list[str], hooks=()) -> dict:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(sweep_run, "build_tuner", functools.partial(sweep_run.build_tuner, epoch_hooks=list(hooks)))
        rc = tune.main(argv)
    lines = out.getvalue().strip().splitlines()
    assert rc == 0, "\n".join(lines[-30:])
    return json.loads(lines[-1])


def _final_ctx(summary: dict) -> torch.Tensor:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    local = client.download_artifacts(summary["best_run_id"], "prompts/prompts.safetensors")
    return load_prompts(local)[0]


@pytest.mark.long
@pytest.mark.ray
def test_a_killed_trial_process_is_retried_from_its_checkpoint(ray_session, small_eurosat_root, feature_cache,
                                                              tiny_vit_config, tmp_path):
    from mlflow.tracking import MlflowClient

    faults.picklable()
    fixed = ["--grid", "prompt.n_ctx=4", "--epochs", "4", "--warmup-epochs", "0", "--lr", "0.3", "--seed", "2"]
    straight = _run([*_common(small_eurosat_root, feature_cache, tiny_vit_config, tmp_path / "a", "straight"),
                     *fixed])
    flag = tmp_path / "killed"
    killed = _run([*_common(small_eurosat_root, feature_cache, tiny_vit_config, tmp_path / "b", "killed"), *fixed,
                   "--max-failures", "1"], hooks=[faults.FailOnce(epoch=2, rank=0, flag_file=str(flag), kill=True)])
    assert flag.read_text().startswith("failed at epoch 2")  # the trial's process really died (SIGKILL)
    assert killed["trial_runner"] == "in-process" and killed["trials_finished"] == 1 and killed["trials_errored"] == 0
    # Resumed from its checkpoint in a new process: the same kernels on the same state, the same steps after it.
    assert torch.equal(_final_ctx(killed), _final_ctx(straight))  # as if never killed
    assert killed["val_acc"] == pytest.approx(straight["val_acc"])
    client = MlflowClient(killed["tracking_uri"])
    parent = client.get_run(killed["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{killed['parent_run_id']}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"  # one run for the trial, not RUNNING
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "val_acc")]
    assert sorted(steps) == [1, 2, 3, 4]  # every epoch logged once, the retried ones included
    # Where the time went is in the child run and the summary.
    metrics = children[0].data.metrics
    for key in ("time_model_s", "time_features_s", "time_train_loop_s", "time_eval_s", "time_queue_s",
                "time_trial_wall_s", "time_overhead_s", "overhead_share"):
        assert key in metrics, key
    # Recomputed from the phases the run holds, unclamped: the trial's wall holds its training loop and evaluation,
    # the overhead is the rest, and its share is the overhead over the wall.
    wall, busy = metrics["time_trial_wall_s"], metrics["time_train_loop_s"] + metrics["time_eval_s"]
    assert wall > busy > 0, (wall, busy)
    assert metrics["time_overhead_s"] == pytest.approx(wall - busy)
    assert metrics["overhead_share"] == pytest.approx((wall - busy) / wall)
    assert straight["timing"]["trials_timed"] == 1 and straight["timing"]["median_time_trial_wall_s"] > 0


def _alive_actors(ray) -> dict[str, str]:
    """Alive actors by id, with their class names.

    Ray's public State API (``ray.util.state``) needs the dashboard, which ``ray[tune,train]`` lacks; the GCS actor
    table behind it is what remains. Test-only use of a private API.
    """
    from ray._private.state import actors

    return {aid: a.get("ActorClassName", "?") for aid, a in actors().items() if a["State"] == "ALIVE"}


def _settled_new_actors(ray, before: dict[str, str], timeout_s: float = 15.0) -> dict[str, str]:
    """Actors alive now that were not before, once kills in flight have landed (``ray.kill`` is asynchronous)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        new = {aid: name for aid, name in _alive_actors(ray).items() if aid not in before}
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.5)


@pytest.mark.long
@pytest.mark.ray
def test_asha_stopped_multi_worker_trials_leave_no_placement_group_or_actor(ray_session, small_eurosat_root,
                                                                          feature_cache, tiny_vit_config, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.util.placement_group import placement_group_table

    ray = ray_session
    actors_before = _alive_actors(ray)
    summary = _run([*_common(small_eurosat_root, feature_cache, tiny_vit_config, tmp_path, "ddp"),
                    "--workers-per-trial", "2", "--cpus-per-worker", "0.5", "--num-samples", "8", "--epochs", "3",
                    "--grace-period", "1", "--reduction-factor", "4", "--max-concurrent", "2"])
    assert summary["trial_runner"] == "ray-train" and summary["trials"] == 8 and summary["trials_errored"] == 0
    assert summary["trials_early_stopped"] >= 1 and summary["trials_finished"] >= 1
    groups = placement_group_table()
    assert groups and all(g["state"] == "REMOVED" for g in groups.values()), {
        pid: g["state"] for pid, g in groups.items() if g["state"] != "REMOVED"}
    left = _settled_new_actors(ray, actors_before)
    # Ray Train creates one named, detached, 0-CPU autoscaling coordinator per cluster on first use (get_if_exists):
    # a cluster singleton, not something a trial leaves behind.
    left = {aid: name for aid, name in left.items() if name != "_AutoscalingCoordinatorActor"}
    assert left == {}  # no trial, controller, placement-group cleaner or trial-controllers actor left
    assert ray.available_resources().get("CPU") == pytest.approx(2.0)  # every CPU is free again
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == 8
    assert {c.info.status for c in children} == {"FINISHED"}
    best = next(c for c in children if c.info.run_id == summary["best_run_id"])
    config = json.loads(Path(client.download_artifacts(best.info.run_id, "config.json", str(tmp_path))).read_text())
    assert config["world_size"] == 2  # the best trial really trained with 2 DDP workers
    assert summary["registered_version"] >= 1
