"""The methods after CoOp through the platform: a sweep over ``method.name`` registers a champion whose method is
recorded, and a registered CoCoOp model is served with its meta-net (each image's own prompts)."""

from __future__ import annotations

import json
from pathlib import Path
from platform.artifacts import CONFIG_FILE, PROMPTS_ARTIFACT_DIR, PROMPTS_FILE
from platform.registry import log_prompt_model
from platform.tune import main

import mlflow
import pandas as pd
import pytest
import torch
from cli_runs import aligned_sweep, child_runs, mlflow_client, run_cli
from numerics import ONE_PASS, assert_reordered
from PIL import Image

from coop_core import load_clip, load_prompts, prompt_model
from coop_core import test_transform as clip_preprocess
from coop_core.datasets import load_dataset

pytestmark = pytest.mark.ray

METHODS = ("coop", "kgcoop", "prograd", "cocoop")


@pytest.fixture(scope="module")
def method_sweep(ray_session, small_eurosat_root, shared_data, feature_cache, tiny_vit_config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    checkpoint, uri, common = aligned_sweep(tmp, data_root=small_eurosat_root, shared_data=shared_data,
                                            feature_cache=feature_cache, tiny_vit_config=tiny_vit_config)
    argv = [*common, "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0", "--ctx-init", "a photo of a",
            "--grid", "train.lr=0.01", "--method", *METHODS, "--max-concurrent", "2", "--sweep-name", "methods"]
    return {"uri": uri, "out": run_cli(main, argv), "checkpoint": checkpoint, "tiny": tiny_vit_config}


def test_a_sweep_over_methods_trains_each_and_registers_the_best_with_its_method(method_sweep):
    summary = method_sweep["out"]["summary"]
    assert summary["trials"] == 4 and summary["trials_errored"] == 0
    client = mlflow_client(method_sweep["uri"])
    runs = child_runs(client, summary["parent_run_id"])
    trained = sorted(r.data.params["method.name"] for r in runs)
    assert trained == sorted(METHODS)
    best = max(runs, key=lambda r: r.data.metrics["val_acc"])
    version = client.get_model_version_by_alias("coop-eurosat", "champion")
    assert version.tags["method"] == summary["best_config"]["method.name"]
    assert version.tags["method"] in METHODS and best.data.metrics["val_acc"] == summary["val_acc"]
    # KgCoOp's and ProGrad's extra terms are tracked per epoch beside the cross-entropy
    by_method = {r.data.params["method.name"]: r for r in runs}
    assert "train_kg" in by_method["kgcoop"].data.metrics and "train_kl" in by_method["prograd"].data.metrics
    assert "train_kg" not in by_method["coop"].data.metrics


def test_a_registered_cocoop_model_serves_its_meta_net(method_sweep, shared_data, small_eurosat_root, tmp_path):
    """Register the sweep's CoCoOp trial and serve it: the pyfunc's probabilities are the CoCoOp model's own (its
    prompts file carries the meta-net), not those of the unshifted context."""
    client = mlflow_client(method_sweep["uri"])
    runs = child_runs(client, method_sweep["out"]["summary"]["parent_run_id"])
    cocoop = next(r for r in runs if r.data.params["method.name"] == "cocoop")
    prompts = client.download_artifacts(cocoop.info.run_id, f"{PROMPTS_ARTIFACT_DIR}/{PROMPTS_FILE}", str(tmp_path))
    ctx, meta = load_prompts(prompts)
    assert meta.method.name == "cocoop" and set(meta.learned) == {
        "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias"}
    spec = json.loads(open(client.download_artifacts(cocoop.info.run_id, CONFIG_FILE, str(tmp_path))).read())
    mlflow.set_tracking_uri(method_sweep["uri"])
    uri = log_prompt_model(str(Path(prompts).parent), spec, run_id=cocoop.info.run_id,
                           tracking_uri=method_sweep["uri"])
    model = mlflow.pyfunc.load_model(uri)
    splits = load_dataset("eurosat", shared_data)
    paths = [str(splits.image_dir / it.path) for it in splits.test[::1350]]
    served = model.predict(pd.DataFrame({"image": paths}))
    clip = load_clip(method_sweep["tiny"], str(method_sweep["checkpoint"]))
    ours = prompt_model(clip, ctx, meta.prompt, meta.classnames, meta.classnames, method=meta.method,
                        learned=meta.learned)
    tf = clip_preprocess(clip.image_size, clip.mean, clip.std)
    with torch.no_grad():
        pixels = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
        probs = ours(pixels).softmax(-1)
        plain = prompt_model(clip, ctx, meta.prompt, meta.classnames, meta.classnames)(pixels).softmax(-1)
    columns = [f"prob_{c}" for c in meta.classnames]
    assert_reordered(torch.tensor(served[columns].to_numpy()), probs.double(), ONE_PASS, "served CoCoOp probabilities")
    assert (probs - plain).abs().max() > 1e-4  # the meta-net's shift is in what is served

