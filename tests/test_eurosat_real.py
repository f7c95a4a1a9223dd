"""EuroSAT on the real data in ../shared/data (skipped when it is absent; failed in CI)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from real_data import data_root, missing
from torchvision.transforms import functional as TF

from coop_core.datasets import ImageListDataset, load_dataset, tree_digest
from coop_core.datasets.eurosat import EUROSAT_TREE_SHA256
from coop_core.fewshot import build_few_shot

DATA_ROOT = data_root()

EUROSAT_CLASSNAMES = (
    "Annual Crop Land",
    "Forest",
    "Herbaceous Vegetation Land",
    "Highway or Road",
    "Industrial Buildings",
    "Pasture Land",
    "Permanent Crop Land",
    "Residential Buildings",
    "River",
    "Sea or Lake",
)


@pytest.fixture(scope="module")
def root() -> Path:
    if not (DATA_ROOT / "eurosat" / "2750").is_dir():
        missing(f"real EuroSAT data not found under {DATA_ROOT} (set COOP_DATA_ROOT)")
    return DATA_ROOT


@pytest.fixture(scope="module")
def eurosat(root):
    return load_dataset("eurosat", root)


def test_coop_split_sizes_and_readable_classnames(eurosat, root):
    assert (len(eurosat.train), len(eurosat.val), len(eurosat.test)) == (13_500, 5_400, 8_100)
    assert eurosat.classnames == EUROSAT_CLASSNAMES
    assert eurosat.template == "a centered satellite photo of {}."
    assert eurosat.image_dir == (root / "eurosat" / "2750").resolve()
    paths = [it.path for split in ("train", "val", "test") for it in eurosat.split(split)]
    assert len(set(paths)) == 27_000  # no image in two splits
    assert eurosat.train[0].path == "AnnualCrop/AnnualCrop_1381.jpg"
    # Labels follow the sorted class folders.
    folders = sorted({p.split("/")[0] for p in paths})
    assert all(folders[it.label] == it.path.split("/")[0] for it in eurosat.test)


def test_split_file_matches_published_checksum(root):
    sums = dict(reversed(line.split("  ", 1)) for line in (root / "SHA256SUMS").read_text().splitlines())
    split = root / "eurosat" / "split_zhou_EuroSAT.json"
    assert hashlib.sha256(split.read_bytes()).hexdigest() == sums["eurosat/split_zhou_EuroSAT.json"]


def test_shipped_tree_digest_reproduces_on_real_images(root):
    assert tree_digest(root / "eurosat" / "2750") == EUROSAT_TREE_SHA256


def test_few_shot_on_real_split(eurosat, tmp_path):
    first = build_few_shot(eurosat, 16, seed=1, cache_dir=tmp_path)
    assert Counter(it.label for it in first.train) == {label: 16 for label in range(10)}
    assert Counter(it.label for it in first.val) == {label: 4 for label in range(10)}
    assert set(first.train) <= set(eurosat.train) and set(first.val) <= set(eurosat.val)
    again = build_few_shot(eurosat, 16, seed=1, cache_dir=tmp_path)
    assert again == first and again.manifest_path == first.manifest_path
    other = build_few_shot(eurosat, 16, seed=2, cache_dir=tmp_path)
    assert set(other.train) != set(first.train)
    assert len(list(tmp_path.glob("*.parquet"))) == 2


def test_image_list_dataset_reads_real_jpeg(eurosat):
    items = [eurosat.test[0], eurosat.test[-1]]
    dataset = ImageListDataset(eurosat.image_dir, items, TF.to_tensor)
    image, label, index = dataset[1]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert (label, index) == (items[1].label, 1) and label == 9
    assert 0.0 <= image.min() < image.max() <= 1.0
