"""Few-shot sampling and the cached Parquet manifests."""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from coop_core import fewshot
from coop_core.datasets import DatasetSplits, Item
from coop_core.fewshot import FewShotSplits, build_few_shot, sample_few_shot

N_PER_CLASS = {0: 30, 1: 25, 2: 20, 3: 3}  # class 3 is smaller than most K
TRAIN_PER_CLASS = {0: 30, 1: 25, 2: 20, 3: 8}  # the toy dataset's train split: K up to 8 fits every class


def make_items(prefix: str, n_per_class: dict[int, int] = N_PER_CLASS) -> list[Item]:
    return [
        Item(f"c{label}/{prefix}_{i:03d}.jpg", label, f"class {label}")
        for label, n in n_per_class.items()
        for i in range(n)
    ]


@pytest.fixture
def splits(tmp_path) -> DatasetSplits:
    return DatasetSplits(
        name="toy",
        image_dir=tmp_path / "data" / "toy" / "images",
        classnames=tuple(f"class {label}" for label in N_PER_CLASS),
        template="a photo of a {}.",
        train=tuple(make_items("train", TRAIN_PER_CLASS)),
        val=tuple(make_items("val", {0: 10, 1: 10, 2: 10, 3: 2})),
        test=tuple(make_items("test", {0: 5, 1: 5, 2: 5, 3: 5})),
    )


def per_class(items) -> dict[int, int]:
    return dict(sorted(Counter(it.label for it in items).items()))


# --- sample_few_shot ----------------------------------------------------------------------------------------------


def test_sample_takes_k_per_class_from_the_pool():
    items = make_items("train")
    sampled = sample_few_shot(items, 4, seed=1)
    assert per_class(sampled) == {0: 4, 1: 4, 2: 4, 3: 3}
    assert len(set(sampled)) == len(sampled)
    assert set(sampled) <= set(items)
    assert [it.label for it in sampled] == sorted(it.label for it in sampled)


def test_sample_is_deterministic_per_seed_and_independent_of_input_order():
    items = make_items("train")
    shuffled = list(items)
    random.Random(123).shuffle(shuffled)
    first = sample_few_shot(items, 8, seed=1)
    assert sample_few_shot(items, 8, seed=1) == first
    assert sample_few_shot(shuffled, 8, seed=1) == first
    assert sample_few_shot(items, 8, seed=2) != first
    # Pinned: the chosen images must not change silently between versions.
    assert [it.path for it in first if it.label == 1][:3] == [
        "c1/train_015.jpg",
        "c1/train_014.jpg",
        "c1/train_024.jpg",
    ]


def test_sample_does_not_touch_the_global_rng():
    random.seed(99)
    state = random.getstate()
    sample_few_shot(make_items("train"), 2, seed=5)
    assert random.getstate() == state


def test_short_class_gives_all_items_and_warns(caplog):
    items = make_items("train")
    with caplog.at_level(logging.WARNING, logger="coop_core.fewshot"):
        sampled = sample_few_shot(items, 16, seed=1)
    assert per_class(sampled) == {0: 16, 1: 16, 2: 16, 3: 3}
    assert "class 3 (class 3) has only 3 items" in caplog.text


@pytest.mark.parametrize("shots", [0, -1, 1.5, True])
def test_sample_rejects_invalid_shots(shots):
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        sample_few_shot(make_items("train"), shots, seed=1)


def test_all_shots_takes_every_item_in_path_order():
    items = make_items("train")
    sampled = sample_few_shot(list(reversed(items)), "all", seed=1)
    assert sampled == sorted(items, key=lambda it: (it.label, it.path))


# --- build_few_shot -----------------------------------------------------------------------------------------------


def test_more_shots_than_the_smallest_class_is_refused_unless_all(splits, tmp_path):
    with pytest.raises(ValueError, match=r"shots 9 is more than the smallest class has: 'class 3' has 8 training "
                                         r"images in toy; use shots <= 8, or shots 'all'"):
        build_few_shot(splits, 9, seed=1, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    every = build_few_shot(splits, "all", seed=1, cache_dir=tmp_path / "cache")
    assert per_class(every.train) == TRAIN_PER_CLASS and per_class(every.val) == {0: 4, 1: 4, 2: 4, 3: 2}
    assert every.manifest_path.name.startswith("fewshot_toy_allshot_seed1_")
    assert build_few_shot(splits, "all", seed=1, cache_dir=tmp_path / "cache") == every  # the manifest is reused


def test_build_without_cache_dir_writes_nothing(splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = build_few_shot(splits, 8, seed=1, cache_dir=None)
    assert result.manifest_path is None
    assert result.train == tuple(sample_few_shot(splits.train, 8, 1))
    assert result.val == tuple(sample_few_shot(splits.val, 4, 1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("shots", "val_per_class"), [(1, {0: 1, 1: 1, 2: 1, 3: 1}), (8, {0: 4, 1: 4, 2: 4, 3: 2})])
def test_build_writes_manifest_with_train_and_capped_val(splits, tmp_path, shots, val_per_class):
    result = build_few_shot(splits, shots, seed=3, cache_dir=tmp_path / "cache")
    assert per_class(result.val) == val_per_class
    assert result.manifest_path is not None and result.manifest_path.parent == tmp_path / "cache"
    assert result.manifest_path.name.startswith(f"fewshot_toy_{shots}shot_seed3_")
    table = pq.read_table(result.manifest_path)
    assert table.column_names == ["split", "path", "label", "classname"]
    rows = table.to_pylist()
    expected = [("train", it) for it in result.train] + [("val", it) for it in result.val]
    assert rows == [{"split": s, "path": it.path, "label": it.label, "classname": it.classname} for s, it in expected]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock") == [
        result.manifest_path.name]


def test_manifest_is_reused(splits, tmp_path, monkeypatch):
    first = build_few_shot(splits, 4, seed=1, cache_dir=tmp_path / "cache")

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached manifest should have been read")

    monkeypatch.setattr(fewshot, "sample_few_shot", no_sampling)
    assert build_few_shot(splits, 4, seed=1, cache_dir=tmp_path / "cache") == first


def test_manifest_key_depends_on_dataset_content_shots_and_seed(splits, tmp_path):
    cache = tmp_path / "cache"
    base = build_few_shot(splits, 4, seed=1, cache_dir=cache).manifest_path
    fewer = DatasetSplits(
        splits.name, splits.image_dir, splits.classnames, splits.template, splits.train[1:], splits.val, ()
    )
    reordered = DatasetSplits(
        splits.name, splits.image_dir, splits.classnames, splits.template, splits.train[::-1], splits.val, ()
    )
    names = {
        base,
        build_few_shot(splits, 4, seed=2, cache_dir=cache).manifest_path,
        build_few_shot(splits, 2, seed=1, cache_dir=cache).manifest_path,
        build_few_shot(fewer, 4, seed=1, cache_dir=cache).manifest_path,
    }
    assert len(names) == 4
    assert build_few_shot(reordered, 4, seed=1, cache_dir=cache).manifest_path == base  # order is not content


def test_damaged_manifest_is_rebuilt(splits, tmp_path, caplog):
    first = build_few_shot(splits, 4, seed=1, cache_dir=tmp_path / "cache")
    first.manifest_path.write_bytes(first.manifest_path.read_bytes()[:100])  # truncated write
    with caplog.at_level(logging.WARNING, logger="coop_core.fewshot"):
        rebuilt = build_few_shot(splits, 4, seed=1, cache_dir=tmp_path / "cache")
    assert "rebuilding" in caplog.text
    assert rebuilt == first
    assert pq.read_table(rebuilt.manifest_path).num_rows == len(first.train) + len(first.val)


def test_manifest_with_foreign_rows_is_rebuilt(splits, tmp_path):
    first = build_few_shot(splits, 4, seed=1, cache_dir=tmp_path / "cache")
    table = pq.read_table(first.manifest_path)
    rows = table.to_pylist()
    rows[0]["path"] = "c0/not_in_the_split.jpg"
    pq.write_table(table.from_pylist(rows, schema=table.schema), first.manifest_path)
    rebuilt = build_few_shot(splits, 4, seed=1, cache_dir=tmp_path / "cache")
    assert rebuilt == first
    assert pq.read_table(first.manifest_path).column("path")[0].as_py() == first.train[0].path


def test_cache_inside_image_folder_is_refused(splits):
    with pytest.raises(ValueError, match="inside the image folder"):
        build_few_shot(splits, 1, seed=1, cache_dir=splits.image_dir / ".cache")


def _build_in_child(splits: DatasetSplits, cache: Path, barrier, queue) -> None:
    barrier.wait()
    result = build_few_shot(splits, 8, seed=7, cache_dir=cache)
    queue.put((result.manifest_path, [it.path for it in result.train]))


def test_concurrent_builders_leave_one_valid_manifest(splits, tmp_path):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    cache = tmp_path / "cache"
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_build_in_child, args=(splits, cache, barrier, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    expected = build_few_shot(splits, 8, seed=7, cache_dir=None)
    assert all(result == results[0] for result in results)
    assert results[0][1] == [it.path for it in expected.train]
    # no temp files left behind (the builders' lock file stays)
    assert sorted(p.name for p in cache.iterdir() if p.suffix != ".lock") == [results[0][0].name]
    reread = fewshot._read_manifest(
        results[0][0], splits, 8, fewshot._metadata(splits, 8, 7, fewshot.source_hash(splits))
    )
    assert reread == (expected.train, expected.val)


def test_fewshot_splits_validates():
    with pytest.raises(ValueError, match="train is empty"):
        FewShotSplits(train=(), val=(), manifest_path=None)
