"""CoCoOp's base-to-new class subsets: base = first ceil(n/2) labels, new = the rest, relabelled 0..m-1."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from coop_core.datasets import CLASS_SUBSETS, class_subset_names, load_dataset, select_classes
from coop_core.datasets.base import DatasetSplits, Item


@pytest.fixture(scope="module")
def eurosat(shared_data: Path) -> DatasetSplits:
    return load_dataset("eurosat", shared_data)


def counts(items) -> Counter:
    return Counter(it.label for it in items)


@pytest.mark.parametrize(("which", "labels"), [("base", range(0, 5)), ("new", range(5, 10))])
def test_eurosat_base_and_new_halves(eurosat, which, labels):
    sub = select_classes(eurosat, which)
    assert sub.classnames == tuple(eurosat.classnames[i] for i in labels)
    assert sub.classnames == class_subset_names(eurosat.classnames, which)
    for split in ("train", "val", "test"):
        full, part = counts(eurosat.split(split)), counts(sub.split(split))
        assert part == {new: full[old] for new, old in enumerate(labels)}  # every item of those classes, relabelled
        assert all(it.classname == sub.classnames[it.label] for it in sub.split(split))
        assert {it.path for it in sub.split(split)} == {it.path for it in eurosat.split(split) if it.label in labels}
    assert sub.name == eurosat.name and sub.template == eurosat.template and sub.image_dir == eurosat.image_dir


def test_base_and_new_partition_the_classes(eurosat):
    base, new = select_classes(eurosat, "base"), select_classes(eurosat, "new")
    assert base.classnames + new.classnames == eurosat.classnames
    assert len(base.train) + len(new.train) == len(eurosat.train) == 13_500
    assert select_classes(eurosat, "all") is eurosat
    assert CLASS_SUBSETS == ("all", "base", "new")


def toy(n_cls: int) -> DatasetSplits:
    names = tuple(f"class{i}" for i in range(n_cls))
    items = tuple(Item(f"{i}_{k}.jpg", i, names[i]) for i in range(n_cls) for k in range(2))
    return DatasetSplits("toy", Path("/data"), names, "a {}.", items, items[:n_cls], items)


def test_odd_class_count_gives_the_extra_class_to_base():
    data = toy(7)
    base, new = select_classes(data, "base"), select_classes(data, "new")
    assert base.classnames == ("class0", "class1", "class2", "class3")
    assert new.classnames == ("class4", "class5", "class6")
    assert [(it.path, it.label) for it in new.train[:3]] == [("4_0.jpg", 0), ("4_1.jpg", 0), ("5_0.jpg", 1)]
    assert counts(new.test) == {0: 2, 1: 2, 2: 2}


def test_unknown_subset_and_one_class_dataset_are_refused():
    with pytest.raises(ValueError, match="unknown class subset 'novel'; expected one of all, base, new"):
        select_classes(toy(4), "novel")
    with pytest.raises(ValueError, match="unknown class subset"):
        class_subset_names(("a", "b"), "half")
    with pytest.raises(ValueError, match="1 class has no new classes.*use --classes all"):
        select_classes(toy(1), "new")
    assert select_classes(toy(1), "base").classnames == ("class0",)
