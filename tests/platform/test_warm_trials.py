"""Warm trial processes: trials that share a process share its loaded CLIP and features, and nothing else.

Two different trials and a repeat run one after another in this process (the way Ray Tune reuses a trial's actor);
each must give exactly what it gives in a fresh process of its own, and the repeat must come from the warm cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from platform import artifacts
from platform.process_cache import ProcessCache, process_cache
from platform.run_spec import RunSpec
from platform.worker import run_training

import pytest
import torch
from sessions import RecordingSession

from coop_core.config import ModelConfig, PromptConfig, TrainConfig
from coop_core.features import CachedViews, FeatureSet
from coop_core.pipeline import RunFeatures

REPO = Path(__file__).resolve().parents[2]
VOLATILE = ("_time_s", "_s", artifacts.ENTERED_AT_KEY, artifacts.PROCESS_CREATED_AT_KEY, artifacts.WARM_HITS_KEY)


def _spec(root: Path, cache: Path, backbone: str, **prompt) -> RunSpec:
    return RunSpec(dataset="eurosat", data_root=str(root), model=ModelConfig(backbone=backbone, pretrained="none"),
                   prompt=PromptConfig(**prompt),
                   train=TrainConfig(shots=2, seed=5, epochs=3, batch_size=8, lr=0.3, warmup_epochs=0, n_views=2),
                   cache_dir=str(cache), max_test_items=30)


def _stable(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.endswith(VOLATILE)}


def _in_child(spec: RunSpec, tmp: Path, name: str) -> dict:
    spec_file, out = tmp / f"{name}.json", tmp / f"{name}.pt"
    spec_file.write_text(json.dumps(spec.to_dict()))
    code = "import sys; sys.path.insert(0, 'tests/platform'); import sessions; sessions.main()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(spec_file), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_trials_sharing_a_process_equal_trials_in_fresh_processes(small_eurosat_root, feature_cache,
                                                                  tiny_vit_config, tmp_path):
    a = _spec(small_eurosat_root, feature_cache, tiny_vit_config, n_ctx=4, class_token_position="end")
    b = _spec(small_eurosat_root, feature_cache, tiny_vit_config, n_ctx=2, csc=True, class_token_position="front")
    process_cache().clear()
    runs = []
    for spec in (a, b, a):
        session = RecordingSession()
        run_training(spec, session)
        runs.append(session)
    first_a, warm_b, warm_a = runs
    assert first_a.reports[0][artifacts.WARM_HITS_KEY] == 0  # a cold process loads everything
    assert warm_b.reports[0][artifacts.WARM_HITS_KEY] == 3  # model, splits and features from the warm cache
    assert warm_a.reports[0][artifacts.WARM_HITS_KEY] == 3
    assert artifacts.PROCESS_CREATED_AT_KEY not in warm_a.reports[0]  # not a fresh process any more

    # Training moved the context, and the warm repeat of A is A exactly: nothing of B leaked into it.
    assert (first_a.contexts[-1] - first_a.contexts[0]).abs().max() > 1e-3
    for x, y in zip(first_a.contexts, warm_a.contexts, strict=True):
        assert torch.equal(x, y)
    assert [_stable(r) for r in first_a.reports] == [_stable(r) for r in warm_a.reports]

    # And each equals the same trial alone in a fresh process.
    for spec, session, name in ((a, first_a, "a"), (b, warm_b, "b")):
        fresh = _in_child(spec, tmp_path, name)
        assert fresh["reports"][0][artifacts.WARM_HITS_KEY] == 0
        for x, y in zip(session.contexts, fresh["contexts"], strict=True):
            assert torch.equal(x, y), name
        assert [_stable(r) for r in session.reports] == [_stable(r) for r in fresh["reports"]], name
    assert {"test_acc", "zeroshot_test_acc"} <= set(warm_b.reports[-1])


def _features(n: int, seed: int = 0) -> RunFeatures:
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(2, n, 8, generator=g)
    labels = torch.arange(n) % 3
    return RunFeatures(CachedViews(views, labels, seed=seed), FeatureSet(torch.randn(n, 8), labels), None)


def test_process_cache_is_bounded_and_least_recently_used():
    one = _features(100).train.views.numel() * 4 + 100 * 8 * 4  # bytes of one entry (views + val)
    cache = ProcessCache(max_models=1, max_bytes=2 * one)
    loads = []

    def load(key):
        loads.append(key)
        return _features(100, seed=len(loads))

    for key in ("a", "b", "a", "c", "a", "b"):  # room for two: c evicts b (least recently used), then b is reloaded
        cache.features(("m", key), lambda key=key: load(key))
    assert loads == ["a", "b", "c", "b"]
    assert cache.nbytes() <= 2 * one
    too_big = ProcessCache(max_bytes=one // 2)
    too_big.features(("m", "x"), lambda: _features(100))
    assert too_big.nbytes() == 0  # an entry larger than the budget is used but not kept

    models = []
    cache.model("m1", lambda: models.append("m1") or "clip1")
    cache.features(("m1", "z"), lambda: _features(10))
    assert any(k[0] == "m1" for k in cache._features)
    cache.model("m2", lambda: models.append("m2") or "clip2")  # max_models=1: m1 goes, with its features
    assert not any(k[0] == "m1" for k in cache._features)
    assert cache.model("m1", lambda: "clip1-again") == ("clip1-again", False)

    off = ProcessCache(max_bytes=0)
    calls = []
    off.model("k", lambda: calls.append(1))
    off.model("k", lambda: calls.append(1))
    assert len(calls) == 2  # 0 bytes turns the cache off
    with pytest.raises(ValueError, match="max_models"):
        ProcessCache(max_models=0)


def test_cached_features_come_with_fresh_per_trial_view_state():
    cache = ProcessCache()
    first, hit1 = cache.features(("m", "k"), lambda: _features(20))
    first.train.batch(torch.arange(4), epoch=7)  # a trial advances its view sampler
    second, hit2 = cache.features(("m", "k"), lambda: pytest.fail("reloaded"))
    assert (hit1, hit2) == (False, True)
    assert second.train is not first.train and second.train._epoch == -1
    assert second.train.views is first.train.views  # the tensors are shared, not copied


def test_warm_cache_size_comes_from_the_environment(monkeypatch):
    from platform import process_cache as pc

    monkeypatch.setattr(pc, "_PROCESS_CACHE", None)
    monkeypatch.setenv(pc.BYTES_ENV_VAR, "1234")
    assert pc.process_cache().max_bytes == 1234
    monkeypatch.setattr(pc, "_PROCESS_CACHE", None)
    monkeypatch.setenv(pc.BYTES_ENV_VAR, "lots")
    with pytest.raises(ValueError, match="COOP_WARM_CACHE_BYTES must be a byte count"):
        pc.process_cache()


def test_long_runs_checkpoint_about_twenty_times_and_report_every_epoch(small_eurosat_root, feature_cache,
                                                                       tiny_vit_config):
    """A checkpoint every epoch costs more than a CoOp epoch on cached features; a 45-epoch run checkpoints every
    3 epochs and at the last, reports metrics every epoch, and resumed from a middle checkpoint ends where a straight
    run ends."""
    from platform import artifacts
    from platform.run_spec import RunSpec
    from platform.worker import run_training

    from coop_core.config import ModelConfig, TrainConfig

    spec = RunSpec(dataset="eurosat", data_root=str(small_eurosat_root), cache_dir=str(feature_cache),
                   model=ModelConfig(backbone=tiny_vit_config, pretrained="none"),
                   train=TrainConfig(shots=1, epochs=45, batch_size=8, n_views=1, warmup_epochs=0),
                   max_test_items=20)
    assert spec.checkpoint_interval() == 3
    assert dataclasses.replace(spec, train=TrainConfig(shots=1, epochs=20)).checkpoint_interval() == 1
    assert dataclasses.replace(spec, checkpoint_every=7).checkpoint_interval() == 7

    class Keeping(RecordingSession):
        def __init__(self, restore=None) -> None:
            super().__init__(restore)
            self.kept: dict[int, tuple] = {}

        def report(self, metrics, checkpoint_dir) -> None:
            super().report(metrics, checkpoint_dir)
            if checkpoint_dir is not None:
                self.kept[int(metrics["epoch"])] = (artifacts.read_train_state(checkpoint_dir),
                                                    artifacts.read_history(checkpoint_dir))

    straight = Keeping()
    run_training(spec, straight)
    assert [int(r["epoch"]) for r in straight.reports] == list(range(1, 46))  # every epoch reported
    assert sorted(straight.kept) == list(range(3, 46, 3))  # 15 checkpoints, the last one final
    resumed = Keeping(restore=straight.kept[21])
    run_training(spec, resumed)
    assert [int(r["epoch"]) for r in resumed.reports] == list(range(22, 46))
    assert torch.equal(resumed.kept[45][0].ctx, straight.kept[45][0].ctx)
    assert resumed.reports[-1]["test_acc"] == straight.reports[-1]["test_acc"]
