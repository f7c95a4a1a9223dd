"""Frozen image features: the content-keyed cache (once, reused, repaired, shared between processes), the training
feature sources, and the pipeline's view extraction through the cache."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import ONE_PASS, assert_reordered, assert_unit_norm
from PIL import Image
from safetensors.torch import load_file, save_file

import coop_core.pipeline as pipeline
from coop_core.config import TrainConfig
from coop_core.datasets import DatasetSplits, Item
from coop_core.features import (
    CachedViews,
    ExactImages,
    FeatureCache,
    cache_key,
    extract_features,
    items_digest,
    weights_identity,
)
from coop_core.fewshot import build_few_shot, registry_eval_items

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PARTS = {"backbone": "tiny-vit", "dataset": "synthetic", "items": "abc", "view": 0}


def _tensors(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"features": scale * torch.arange(12.0).view(3, 4), "labels": torch.tensor([0, 1, 2])}


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, scale: float = 1.0) -> None:
        self.calls = 0
        self.scale = scale

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return _tensors(self.scale)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- FeatureCache -----------------------------------------------------------------------------------------------


def test_cache_computes_once_and_reuses_across_instances(tmp_path):
    compute = Counter()
    first = FeatureCache(tmp_path).get_or_compute(PARTS, compute)
    second = FeatureCache(tmp_path).get_or_compute(dict(reversed(PARTS.items())), compute)  # key order is irrelevant
    assert compute.calls == 1
    _assert_same(first, _tensors())
    _assert_same(second, first)
    path = FeatureCache(tmp_path).path(cache_key(PARTS))
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically: no leftovers

    FeatureCache(tmp_path).get_or_compute(PARTS | {"view": 1}, compute)  # another key is another entry
    assert compute.calls == 2


def test_truncated_entry_is_detected_and_rebuilt(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    compute = Counter()
    cache.get_or_compute(PARTS, compute)
    path = cache.path(cache_key(PARTS))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    again = cache.get_or_compute(PARTS, compute)
    assert compute.calls == 2
    _assert_same(again, _tensors())
    assert "damaged" in caplog.text
    _assert_same(load_file(str(path)), _tensors())  # repaired on disk
    cache.get_or_compute(PARTS, compute)
    assert compute.calls == 2


def test_entry_whose_tensors_do_not_match_their_checksum_is_rebuilt(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    compute = Counter()
    cache.get_or_compute(PARTS, compute)
    path = cache.path(cache_key(PARTS))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(_tensors(scale=2.0), str(path), metadata=meta)  # valid file, stale digest
    again = cache.get_or_compute(PARTS, compute)
    assert compute.calls == 2
    _assert_same(again, _tensors())
    assert "checksum" in caplog.text

    save_file(_tensors(), str(path))  # no digest at all
    cache.get_or_compute(PARTS, compute)
    assert compute.calls == 3


def _cache_worker(root: str, barrier, index: int) -> None:
    """One of several processes asking for the same entry at the same moment."""

    def compute() -> dict[str, torch.Tensor]:
        (Path(root) / "computed" / f"{os.getpid()}").write_text("")
        time.sleep(0.5)  # long enough for the others to be waiting on the lock
        return _tensors()

    barrier.wait()
    out = FeatureCache(Path(root) / "cache").get_or_compute(PARTS, compute)
    (Path(root) / "results" / f"{index}.txt").write_text(str(out["features"].sum().item()))


def test_concurrent_processes_compute_an_entry_once(tmp_path):
    (tmp_path / "computed").mkdir()
    (tmp_path / "results").mkdir()
    ctx = multiprocessing.get_context("fork")  # a fresh interpreter per worker would cost seconds of imports
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_cache_worker, args=(str(tmp_path), barrier, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(list((tmp_path / "computed").iterdir())) == 1
    results = {f.read_text() for f in (tmp_path / "results").iterdir()}
    assert results == {str(_tensors()["features"].sum().item())}


def test_cache_key_and_digests_follow_content(tmp_path):
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    items = [Item("a/1.png", 0, "a"), Item("b/1.png", 1, "b")]
    assert items_digest(items) == items_digest(list(items))
    assert items_digest(items) != items_digest(items[::-1])  # order is the row order of the features
    assert items_digest(items) != items_digest([Item("a/1.png", 1, "b"), items[1]])
    assert weights_identity("openai") == "tag:openai"
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"1234")
    first = weights_identity(str(ckpt))
    assert first.startswith(f"file:{ckpt.resolve()}:4:")
    ckpt.write_bytes(b"123456")
    assert weights_identity(str(ckpt)) != first  # a replaced checkpoint is a different key


# --- training feature sources -------------------------------------------------------------------------------------


def _coded_views(n_views: int = 4, n: int = 10) -> torch.Tensor:
    """views[v, i] is a constant vector of value 100 * v + i, so a returned row says which view and item it is."""
    code = 100.0 * torch.arange(n_views)[:, None] + torch.arange(n)[None, :]
    return code[..., None].expand(n_views, n, 3).clone()


def _decode(rows: torch.Tensor) -> tuple[list[int], list[int]]:
    code = rows[:, 0].long()
    return (code // 100).tolist(), (code % 100).tolist()


def test_cached_views_draw_one_view_per_image_reproducibly_per_epoch():
    views, labels = _coded_views(), torch.arange(10)
    source = CachedViews(views, labels, seed=3)
    everything = torch.arange(10)
    chosen, items = _decode(source.batch(everything, epoch=0))
    assert items == list(range(10))
    # The same (seed, epoch) gives the same views, in any batch order and in another instance (DDP, resume).
    assert _decode(CachedViews(views, labels, seed=3).batch(everything, epoch=0))[0] == chosen
    part = torch.tensor([7, 2, 5])
    assert _decode(source.batch(part, epoch=0)) == ([chosen[7], chosen[2], chosen[5]], [7, 2, 5])
    # Another epoch or seed draws other views; over epochs every view is used.
    assert _decode(source.batch(everything, epoch=1))[0] != chosen
    assert _decode(CachedViews(views, labels, seed=4).batch(everything, epoch=0))[0] != chosen
    used = {v for e in range(20) for v in _decode(source.batch(everything, e))[0]}
    assert used == {0, 1, 2, 3}
    assert _decode(source.batch(everything, epoch=0))[0] == chosen  # going back to an epoch redraws the same


def test_cached_views_validate_shapes():
    with pytest.raises(ValueError, match=r"\(n_views, n, d\)"):
        CachedViews(torch.zeros(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="10 feature rows but 9 labels"):
        CachedViews(torch.zeros(2, 10, 3), torch.zeros(9))


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i


def test_extract_features_are_normalised_and_in_dataset_order(tiny_clip):
    data = _ImageSet(7)
    feats, labels = extract_features(tiny_clip.model.visual, data, batch_size=3)
    assert feats.shape == (7, 32) and feats.dtype == torch.float32
    assert_unit_norm(feats, "extracted features")
    with torch.no_grad():
        expected = F.normalize(tiny_clip.model.visual(data.images), dim=-1)
    assert_reordered(feats, expected, ONE_PASS, "batches of 3 vs one batch of 7")  # other GEMM shapes
    assert labels.dtype == torch.long and labels.tolist() == data.labels.tolist()
    bf16, _ = extract_features(tiny_clip.model.visual, data, batch_size=3, precision="bf16")
    assert bf16.dtype == torch.float32
    assert (bf16 - feats).abs().max() < 0.05
    with pytest.raises(ValueError, match="empty"):
        extract_features(tiny_clip.model.visual, _ImageSet(0))


def test_exact_images_encode_the_requested_items():
    data = _ImageSet(5)
    seen = []

    def encode(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        return images.flatten(1)[:, :4]

    source = ExactImages(data, data.labels, encode)
    out = source.batch(torch.tensor([4, 0]), epoch=0)
    assert seen == [2]
    assert torch.equal(out, data.images[[4, 0]].flatten(1)[:, :4])


# --- the pipeline's features through the cache ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> DatasetSplits:
    """3 classes x 6 random 20x20 RGB PNGs: 2 train, 2 val and 2 test images per class."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    names = ("red_square", "blue_circle", "green_line")
    split_items: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        (root / name).mkdir()
        for j in range(6):
            rel = f"{name}/{j}.png"
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / rel)
            split_items[("train", "val", "test")[j // 2]].append(Item(rel, label, name.replace("_", " ")))
    return DatasetSplits("synthetic", root.resolve(), tuple(n.replace("_", " ") for n in names), "a photo of a {}.",
                         *(tuple(split_items[s]) for s in ("train", "val", "test")))


def test_prepare_features_computes_each_entry_once_and_reuses_it(tiny_clip, image_folder, tmp_path, monkeypatch):
    calls = []
    real = pipeline.extract_readable

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "extract_readable", counting)
    fewshot = build_few_shot(image_folder, 2, 1, None)
    cfg = TrainConfig(shots=2, n_views=3)
    first = pipeline.prepare_features(tiny_clip, image_folder, fewshot, cfg, cache_dir=tmp_path / "cache")
    n_registry = len(registry_eval_items(image_folder.val))  # the registry evaluation set: the whole small val split
    assert n_registry == len(image_folder.val) and first.registry.labels.shape == (n_registry,)
    assert sorted(calls) == sorted([6, 6, n_registry, 6, 6, 6])  # val, test, registry set, 3 training views of 6
    second = pipeline.prepare_features(tiny_clip, image_folder, fewshot, cfg, cache_dir=tmp_path / "cache")
    assert len(calls) == 6 and second.registry_set == first.registry_set
    assert torch.equal(first.train.views, second.train.views)
    assert torch.equal(first.test.features, second.test.features)

    views = first.train.views  # (n_views, n, d): augmented views differ from each other ...
    assert views.shape == (3, 6, 32)
    assert (views[0] - views[1]).abs().max() > 1e-3
    # ... and are reproducible from the seed without the cache, and change with it.
    fresh = pipeline.prepare_features(tiny_clip, image_folder, fewshot, cfg, cache_dir=None, with_test=False)
    assert torch.equal(fresh.train.views, views)
    assert fresh.test is None and fresh.registry is None and fresh.registry_set is None
    reseeded = pipeline.prepare_features(tiny_clip, image_folder, fewshot, TrainConfig(shots=2, n_views=3, seed=2),
                                         cache_dir=None, with_test=False)
    assert (reseeded.train.views - views).abs().max() > 1e-3
    # Evaluation features are the centre-crop features, identical for val and test images alike.
    assert_unit_norm(first.val.features, "evaluation features")
    assert first.val.labels.tolist() == [it.label for it in fewshot.val]


def test_exact_mode_encodes_fresh_augmentations(tiny_clip, image_folder):
    fewshot = build_few_shot(image_folder, 2, 1, None)
    feats = pipeline.prepare_features(tiny_clip, image_folder, fewshot, TrainConfig(shots=2, feature_mode="exact"),
                                      cache_dir=None, with_test=False)
    assert isinstance(feats.train, ExactImages)
    a = feats.train.batch(torch.arange(6), epoch=0)
    b = feats.train.batch(torch.arange(6), epoch=0)
    assert a.shape == (6, 32)
    assert_unit_norm(a, "exact-mode features")
    assert (a - b).abs().max() > 1e-3  # a new random crop every time, as the reference implementation does


def test_prepare_features_reports_progress_in_images_computed_or_cached(tiny_clip, image_folder, tmp_path):
    fewshot = build_few_shot(image_folder, 2, 1, None)
    cfg = TrainConfig(shots=2, n_views=3)
    for _ in range(2):  # computed, then read from the cache: the same count either way
        seen: list[tuple[str, int, int]] = []
        pipeline.prepare_features(tiny_clip, image_folder, fewshot, cfg, cache_dir=tmp_path / "cache",
                                  batch_size=4, progress=lambda *a, seen=seen: seen.append(a))
        total = 6 + 6 + 3 * 6 + len(image_folder.val)  # val, test, 3 training views, the registry set (all of val)
        assert {task for task, _, _ in seen} == {"features"} and {t for _, _, t in seen} == {total}
        done = [d for _, d, _ in seen]
        assert done == sorted(done) and done[-1] == total and done[0] < total


def test_unreadable_images_are_skipped_and_counted_non_rgb_ones_converted(tiny_clip, image_folder, tmp_path, caplog):
    """A corrupt and a truncated image are left out (counted, also when read back from the cache); a greyscale and a
    palette image are converted to RGB and used."""
    import dataclasses
    import logging
    import shutil

    root = tmp_path / "images"
    shutil.copytree(image_folder.image_dir, root)
    (root / "red_square" / "0.png").write_bytes(b"not an image")  # corrupt: a train image
    whole = (root / "blue_circle" / "4.png").read_bytes()
    (root / "blue_circle" / "4.png").write_bytes(whole[: len(whole) // 2])  # truncated: a test image
    Image.open(root / "green_line" / "0.png").convert("L").save(root / "green_line" / "0.png")  # greyscale train
    Image.open(root / "green_line" / "2.png").convert("P").save(root / "green_line" / "2.png")  # palette val
    splits = dataclasses.replace(image_folder, image_dir=root)
    fewshot = build_few_shot(splits, 2, 1, None)
    cfg = TrainConfig(shots=2, n_views=2)
    for _ in range(2):  # computed, then read back from the cache: the count is the same
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="coop_core.pipeline"):
            feats = pipeline.prepare_features(tiny_clip, splits, fewshot, cfg, cache_dir=tmp_path / "cache")
        assert feats.skipped == {"train": 1, "val": 0, "test": 1}
        assert feats.train.views.shape[:2] == (2, 5) and feats.train.labels.tolist() == [0, 1, 1, 2, 2]
        assert feats.test.features.shape[0] == 5 and feats.val.features.shape[0] == 6
        assert "skipped 1 of 6 train images that cannot be decoded" in caplog.text and "red_square/0.png" in caplog.text
        assert "skipped 1 of 6 test images" in caplog.text and "blue_circle/4.png" in caplog.text
    exact = pipeline.prepare_features(tiny_clip, splits, fewshot, TrainConfig(shots=2, feature_mode="exact"),
                                      cache_dir=None, with_test=False)
    assert exact.skipped["train"] == 1 and exact.train.batch(torch.arange(5), epoch=0).shape == (5, 32)
    (root / "red_square" / "1.png").write_bytes(b"")  # now both training images of the class are unreadable
    with pytest.raises(ValueError, match="every training image of class 'red square' is unreadable"):
        pipeline.prepare_features(tiny_clip, splits, fewshot, cfg, cache_dir=None, with_test=False)
