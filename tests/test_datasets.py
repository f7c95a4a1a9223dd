"""Dataset registry, loaders, CoOp split files, the image dataset and the opt-in download (all offline)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_data import data_root, missing

from coop_core.catalog import Catalog
from coop_core.datasets import (
    DatasetNotFoundError,
    DatasetSpec,
    DownloadError,
    ImageListDataset,
    Item,
    base,
    classnames_from_items,
    eurosat,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    read_coop_split,
    register_dataset,
    tree_digest,
)

COOP_SPLITS = data_root() / "coop_splits"

ALL_DATASETS = [
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "food101",
    "imagenet",
    "imagenet_a",
    "imagenet_r",
    "imagenet_sketch",
    "imagenet_v2",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
]

EUROSAT_FOLDERS = {"AnnualCrop": 10, "Forest": 20, "SeaLake": 7}


def make_image_folder(image_dir: Path, counts: dict[str, int], order: str = "forward") -> list[str]:
    """Class folders of distinct small files (the loaders never decode them); returns the relative paths."""
    paths = []
    for folder, n in counts.items():
        (image_dir / folder).mkdir(parents=True, exist_ok=True)
        indices = range(1, n + 1) if order == "forward" else range(n, 0, -1)
        for i in indices:
            rel = f"{folder}/{folder}_{i}.jpg"
            (image_dir / rel).write_bytes(f"{rel}".encode())
            paths.append(rel)
    return sorted(paths)


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_lists_all_coop_datasets_sorted():
    assert list_datasets() == ALL_DATASETS


@pytest.mark.parametrize(
    ("name", "dataset_dir", "image_dir", "template"),
    [
        ("eurosat", "eurosat", "2750", "a centered satellite photo of {}."),
        ("caltech101", "caltech-101", "101_ObjectCategories", "a photo of a {}."),
        ("oxford_pets", "oxford_pets", "images", "a photo of a {}, a type of pet."),
        ("stanford_cars", "stanford_cars", "", "a photo of a {}."),
        ("oxford_flowers", "oxford_flowers", "jpg", "a photo of a {}, a type of flower."),
        ("food101", "food-101", "images", "a photo of {}, a type of food."),
        ("sun397", "sun397", "SUN397", "a photo of a {}."),
        ("dtd", "dtd", "images", "{} texture."),
        ("ucf101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}."),
        ("fgvc_aircraft", "fgvc_aircraft", "images", "a photo of a {}, a type of aircraft."),
        ("imagenet", "imagenet", "images", "a photo of a {}."),
    ],
)
def test_specs_match_coop_layout_and_templates(name, dataset_dir, image_dir, template):
    spec = get_dataset_spec(name)
    assert (spec.name, spec.dataset_dir, spec.image_dir, spec.template) == (name, dataset_dir, image_dir, template)


def test_unknown_dataset_error_lists_available_datasets():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'") as info:
        get_dataset_spec("cifar10")
    assert ", ".join(ALL_DATASETS) in str(info.value)
    with pytest.raises(ValueError, match="oxford_pets"):
        load_dataset("cifar10", "/nonexistent")


def test_duplicate_registration_raises(monkeypatch):
    scratch = Catalog("dataset", DatasetSpec)  # the test's registrations go here, not into the real catalog
    for name in base._DATASETS.names():
        scratch.add(name, base._DATASETS.get(name))
    monkeypatch.setattr(base, "_DATASETS", scratch)
    spec = DatasetSpec(
        name="toy_set",
        dataset_dir="toy",
        image_dir="images",
        split_file=None,
        template="a photo of a {}.",
        loader=lambda root, spec: None,
        layout="<root>/toy/images/<class>/*.jpg",
    )
    assert register_dataset(spec) is spec
    assert get_dataset_spec("toy_set") is spec
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(spec)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(get_dataset_spec("eurosat"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "EuroSAT", "lowercase"),
        ("name", "oxford-pets", "lowercase"),
        ("template", "a photo of a class.", "exactly one"),
        ("template", "{} and {}", "exactly one"),
        ("layout", "  ", "layout"),
    ],
)
def test_spec_validation_rejects_bad_fields(field, value, message):
    fields = {
        "name": "toy",
        "dataset_dir": "toy",
        "image_dir": "images",
        "split_file": None,
        "template": "a photo of a {}.",
        "loader": lambda root, spec: None,
        "layout": "<root>/toy/images",
    }
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**fields)


def test_item_rejects_absolute_and_windows_paths():
    with pytest.raises(ValueError, match="relative"):
        Item("/abs/x.jpg", 0, "cat")
    with pytest.raises(ValueError, match="POSIX"):
        Item("cat\\x.jpg", 0, "cat")
    with pytest.raises(ValueError, match="no '..'"):
        Item("cat/../../etc/passwd", 0, "cat")
    with pytest.raises(ValueError, match="label"):
        Item("x.jpg", -1, "cat")
    item = Item("x.jpg", np.int64(2), "cat")  # labels from numpy / Arrow arrays become plain ints
    assert type(item.label) is int and item == Item("x.jpg", 2, "cat")


def test_splits_reject_inconsistent_class_names(tmp_path):
    with pytest.raises(ValueError, match="named 'dog' but label 0 is 'cat'"):
        base.DatasetSplits("toy", tmp_path, ("cat",), "a {}.", (Item("a.jpg", 0, "dog"),), (), ())
    splits = base.DatasetSplits("toy", tmp_path, ("cat",), "a {}.", (Item("a.jpg", 0, "cat"),), (), ())
    assert splits.split("train") == (Item("a.jpg", 0, "cat"),)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        splits.split("dev")


# --- missing data -----------------------------------------------------------------------------------------------


def test_missing_eurosat_error_shows_layout_and_download_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("eurosat", tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "eurosat" / "2750") in message
    assert get_dataset_spec("eurosat").layout in message
    assert "--download" in message and "DATASETS.md" in message


def test_missing_data_without_download_support(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no automatic download") as info:
        load_dataset("oxford_pets", tmp_path, download=True)
    assert "split_zhou_OxfordPets.json" in str(info.value)
    assert not (tmp_path / "oxford_pets").exists()


def test_missing_split_file_is_reported(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("dtd", tmp_path)
    assert f"{tmp_path / 'dtd' / 'split_zhou_DescribableTextures.json'} does not exist" in str(info.value)


# --- EuroSAT on synthetic trees -----------------------------------------------------------------------------------


def test_eurosat_fallback_split_is_deterministic_50_20_30(tmp_path, caplog):
    files = make_image_folder(tmp_path / "a" / "eurosat" / "2750", EUROSAT_FOLDERS)
    make_image_folder(tmp_path / "b" / "eurosat" / "2750", EUROSAT_FOLDERS, order="reverse")
    with caplog.at_level(logging.WARNING, logger="coop_core.datasets.eurosat"):
        first = load_dataset("eurosat", tmp_path / "a")
    assert "not comparable" in caplog.text
    second = load_dataset("eurosat", tmp_path / "b")

    assert first.classnames == ("Annual Crop Land", "Forest", "Sea or Lake")
    assert first.image_dir == (tmp_path / "a" / "eurosat" / "2750").resolve()
    # round(n * 0.5) / round(n * 0.2) / rest, per class: 10 -> 5/2/3, 20 -> 10/4/6, 7 -> 4/1/2 (round half to even).
    counts = {
        split: [sum(it.label == c for it in first.split(split)) for c in range(3)] for split in ("train", "val", "test")
    }
    assert counts == {"train": [5, 10, 4], "val": [2, 4, 1], "test": [3, 6, 2]}
    all_paths = [it.path for split in ("train", "val", "test") for it in first.split(split)]
    assert sorted(all_paths) == files  # a partition: every image exactly once
    assert (first.train, first.val, first.test) == (second.train, second.val, second.test)
    # Pinned: a change of the fallback algorithm (RNG, sorting, rounding) must be deliberate.
    assert sorted(it.path for it in first.train if it.label == 0) == [
        "AnnualCrop/AnnualCrop_5.jpg",
        "AnnualCrop/AnnualCrop_6.jpg",
        "AnnualCrop/AnnualCrop_7.jpg",
        "AnnualCrop/AnnualCrop_8.jpg",
        "AnnualCrop/AnnualCrop_9.jpg",
    ]


def test_eurosat_uses_split_file_when_present(tmp_path):
    image_dir = tmp_path / "eurosat" / "2750"
    make_image_folder(image_dir, EUROSAT_FOLDERS)
    split = {
        "train": [["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"], ["Forest/Forest_1.jpg", 1, "Forest"]],
        "val": [["Forest/Forest_2.jpg", 1, "Forest"]],
        "test": [["SeaLake/SeaLake_1.jpg", 2, "Sea or Lake"]],
    }
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    splits = load_dataset("eurosat", tmp_path)
    assert [it.path for it in splits.train] == ["AnnualCrop/AnnualCrop_1.jpg", "Forest/Forest_1.jpg"]
    assert [it.path for it in splits.test] == ["SeaLake/SeaLake_1.jpg"]
    assert splits.classnames == ("Annual Crop Land", "Forest", "Sea or Lake")


def test_fallback_split_refuses_classes_too_small_to_split(tmp_path):
    make_image_folder(tmp_path / "eurosat" / "2750", {"Forest": 2})
    with pytest.raises(ValueError, match="2750/Forest has 2 images: too few .*; add images"):
        load_dataset("eurosat", tmp_path)
    (tmp_path / "eurosat" / "2750" / "Empty").mkdir()  # an empty class folder
    with pytest.raises(ValueError, match="2750/Empty has 0 images"):
        load_dataset("eurosat", tmp_path)


# --- CoOp split files ---------------------------------------------------------------------------------------------


def test_read_coop_split_makes_names_readable_and_paths_posix(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(
        json.dumps(
            {
                "train": [["american_bulldog\\a.jpg", 1, "american_bulldog"], ["b.jpg", 0, "abyssinian"]],
                "val": [],
                "test": [["c.jpg", 1, "american_bulldog"]],
            }
        )
    )
    train, val, test = read_coop_split(path)
    assert train == [Item("american_bulldog/a.jpg", 1, "american bulldog"), Item("b.jpg", 0, "abyssinian")]
    assert (val, test) == ([], [Item("c.jpg", 1, "american bulldog")])
    assert classnames_from_items(train, val, test) == ("abyssinian", "american bulldog")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"train": [], "val": []}), "keys"),
        (json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}), r"train\[0\]"),
        (json.dumps({"train": [["a.jpg", "0", "cat"]], "val": [], "test": []}), "label"),
    ],
)
def test_read_coop_split_rejects_malformed_files(tmp_path, payload, message):
    path = tmp_path / "split.json"
    path.write_text(payload)
    with pytest.raises(ValueError, match=message):
        read_coop_split(path)


def test_split_entries_outside_the_image_folder_are_refused(tmp_path):
    path = tmp_path / "split.json"
    for bad in ("../../etc/passwd", "/etc/passwd", "cat/../../x.jpg"):
        path.write_text(json.dumps({"train": [["a.jpg", 0, "cat"], [bad, 0, "cat"]], "val": [], "test": []}))
        with pytest.raises(ValueError, match=r"train\[1\] names .*, outside the image folder: split paths are "
                                             r"relative to it, with no '..'"):
            read_coop_split(path)


def test_a_class_without_training_images_is_refused(tmp_path):
    splits = base.DatasetSplits("toy", tmp_path, ("cat", "dog"), "a {}.", (Item("a.jpg", 0, "cat"),), (),
                                (Item("b.jpg", 1, "dog"),))
    with pytest.raises(ValueError, match=r"1 class\(es\) of toy have no training images \(first: 'dog'\)"):
        base.check_every_class_has_training_images(splits)
    base.check_every_class_has_training_images(dataclasses.replace(splits, train=(*splits.train, splits.test[0])))


def test_split_entries_naming_missing_images_are_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    items = (Item("a.jpg", 0, "cat"), Item("gone.jpg", 0, "cat"))
    splits = base.DatasetSplits("toy", tmp_path, ("cat",), "a {}.", items, (), ())
    with pytest.raises(ValueError, match=r"1 of 2 images the run needs are not under .* \(first: 'gone.jpg'\)"):
        base.check_images_exist(splits, items)
    base.check_images_exist(splits, items[:1])


def test_classnames_from_items_rejects_inconsistent_labels():
    with pytest.raises(ValueError, match="two class names"):
        classnames_from_items([Item("a.jpg", 0, "cat"), Item("b.jpg", 0, "dog")])
    with pytest.raises(ValueError, match=r"\[1\] have no items"):
        classnames_from_items([Item("a.jpg", 0, "cat"), Item("b.jpg", 2, "dog")])


REAL_SPLITS = [
    ("caltech101", "split_zhou_Caltech101.json", 100, "face"),
    ("dtd", "split_zhou_DescribableTextures.json", 47, "banded"),
    ("oxford_flowers", "split_zhou_OxfordFlowers.json", 102, "pink primrose"),
    ("oxford_pets", "split_zhou_OxfordPets.json", 37, "abyssinian"),
    ("stanford_cars", "split_zhou_StanfordCars.json", 196, "2000 AM General Hummer SUV"),
    ("ucf101", "split_zhou_UCF101.json", 101, "Apply Eye Makeup"),
]


def _sha256sums() -> dict[str, str]:
    sums = {}
    for line in (COOP_SPLITS.parent / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        sums[name.strip()] = digest
    return sums


@pytest.mark.parametrize(("name", "filename", "n_classes", "first_class"), REAL_SPLITS)
def test_real_coop_split_files_load_through_registry(tmp_path, name, filename, n_classes, first_class):
    source = COOP_SPLITS / filename
    if not source.is_file():
        missing(f"CoOp split files not found under {COOP_SPLITS} (set COOP_DATA_ROOT)")
    assert hashlib.sha256(source.read_bytes()).hexdigest() == _sha256sums()[f"coop_splits/{filename}"]
    raw = json.loads(source.read_text())
    train, val, test = read_coop_split(source)
    assert (len(train), len(val), len(test)) == (len(raw["train"]), len(raw["val"]), len(raw["test"]))

    spec = get_dataset_spec(name)
    spec.image_path(tmp_path).mkdir(parents=True, exist_ok=True)  # the loader checks the folder, not each image
    (spec.dataset_path(tmp_path) / filename).symlink_to(source)
    splits = load_dataset(name, tmp_path)
    assert len(splits.classnames) == n_classes
    assert splits.classnames[0] == first_class
    assert not any("_" in c for c in splits.classnames)
    assert splits.train == tuple(train) and splits.val == tuple(val) and splits.test == tuple(test)
    assert splits.image_dir == spec.image_path(tmp_path).resolve()
    assert {it.label for it in splits.test} == set(range(n_classes))


def test_oxford_flowers_names_agree_with_cat_to_name(tmp_path):
    source = COOP_SPLITS / "split_zhou_OxfordFlowers.json"
    if not source.is_file():
        missing(f"CoOp split files not found under {COOP_SPLITS} (set COOP_DATA_ROOT)")
    cat_to_name = json.loads((COOP_SPLITS / "cat_to_name.json").read_text())
    names = classnames_from_items(*read_coop_split(source))
    assert list(names) == [cat_to_name[str(label + 1)] for label in range(102)]


def test_stanford_cars_paths_are_relative_to_dataset_dir(tmp_path):
    (tmp_path / "stanford_cars").mkdir()
    split = {"train": [["cars_train/00001.jpg", 0, "2012 Audi TTS Coupe"]], "val": [], "test": []}
    (tmp_path / "stanford_cars" / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    splits = load_dataset("stanford_cars", tmp_path)
    assert splits.image_dir == (tmp_path / "stanford_cars").resolve()
    assert splits.train[0].path == "cars_train/00001.jpg"


# --- FGVC-Aircraft and ImageNet -----------------------------------------------------------------------------------


def test_fgvc_aircraft_reads_variant_lists(tmp_path):
    data = tmp_path / "fgvc_aircraft"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nF-16A/B\nFalcon 2000\n")
    (data / "images_variant_train.txt").write_text("1025794 707-320\n0056978 Falcon 2000\n")
    (data / "images_variant_val.txt").write_text("2233384 F-16A/B\n")
    (data / "images_variant_test.txt").write_text("1514522 F-16A/B\n\n")
    splits = load_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == ("707-320", "F-16A/B", "Falcon 2000")
    assert splits.train == (Item("1025794.jpg", 0, "707-320"), Item("0056978.jpg", 2, "Falcon 2000"))
    assert splits.val == (Item("2233384.jpg", 1, "F-16A/B"),)
    assert splits.test == (Item("1514522.jpg", 1, "F-16A/B"),)

    (data / "images_variant_test.txt").write_text("1514522 Boeing 747\n")
    with pytest.raises(ValueError, match="'Boeing 747'"):
        load_dataset("fgvc_aircraft", tmp_path)
    (data / "variants.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="variants.txt"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_imagenet_uses_val_as_test_and_readable_names(tmp_path):
    data = tmp_path / "imagenet"
    (data / "classnames.txt").parent.mkdir(parents=True)
    (data / "classnames.txt").write_text("n01443537 goldfish\nn01440764 tench\nn01484850 great white shark\n")
    for folder, wnid, n in [("train", "n01440764", 2), ("train", "n01443537", 1), ("train", "n01484850", 1)]:
        make_image_folder(data / "images" / folder, {wnid: n})
    make_image_folder(data / "images" / "val", {"n01440764": 1, "n01484850": 1})
    splits = load_dataset("imagenet", tmp_path)
    assert splits.classnames == ("tench", "goldfish", "great white shark")  # labels follow sorted wnids
    assert [(it.path, it.label) for it in splits.train] == [
        ("train/n01440764/n01440764_1.jpg", 0),
        ("train/n01440764/n01440764_2.jpg", 0),
        ("train/n01443537/n01443537_1.jpg", 1),
        ("train/n01484850/n01484850_1.jpg", 2),
    ]
    assert splits.val == splits.test
    assert [it.path for it in splits.test] == ["val/n01440764/n01440764_1.jpg", "val/n01484850/n01484850_1.jpg"]

    make_image_folder(data / "images" / "train", {"n99999999": 1})
    with pytest.raises(ValueError, match="n99999999 is not a class listed"):
        load_dataset("imagenet", tmp_path)


# --- ImageListDataset ---------------------------------------------------------------------------------------------


def test_image_list_dataset_returns_rgb_label_and_index(tmp_path):
    Image.new("L", (5, 4), color=200).save(tmp_path / "gray.png")
    Image.new("RGBA", (6, 6), color=(10, 20, 30, 40)).save(tmp_path / "rgba.png")
    items = [Item("gray.png", 3, "cat"), Item("rgba.png", 1, "dog")]
    to_tensor = lambda image: torch.tensor(list(image.getdata()), dtype=torch.uint8).T  # noqa: E731
    dataset = ImageListDataset(tmp_path, items, to_tensor)
    assert len(dataset) == 2
    image, label, index = dataset[1]
    assert (label, index) == (1, 1)
    assert image.shape == (3, 36) and image[:, 0].tolist() == [10, 20, 30]
    gray, label, index = dataset[0]
    assert (label, index) == (3, 0) and gray[:, 0].tolist() == [200, 200, 200]
    raw, _, _ = ImageListDataset(tmp_path, items)[0]
    assert raw.mode == "RGB" and raw.size == (5, 4)


# --- download -----------------------------------------------------------------------------------------------------


def test_tree_digest_follows_the_documented_format(tmp_path):
    make_image_folder(tmp_path / "tree", {"B": 1, "A": 2})
    (tmp_path / "tree" / "A" / "notes.txt").write_text("ignored")
    lines = sorted(
        f"{rel}\t{hashlib.sha256((tmp_path / 'tree' / rel).read_bytes()).hexdigest()}\n"
        for rel in ["A/A_1.jpg", "A/A_2.jpg", "B/B_1.jpg"]
    )
    expected = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert tree_digest(tmp_path / "tree") == expected
    (tmp_path / "tree" / "B" / "B_1.jpg").write_bytes(b"changed")
    assert tree_digest(tmp_path / "tree") != expected


def make_eurosat_zip(tmp_path: Path, top: str | None) -> tuple[Path, str]:
    """A miniature EuroSAT archive with top folder ``top``; returns its path and its payload digest."""
    source = tmp_path / "source"
    files = make_image_folder(source, EUROSAT_FOLDERS)
    archive = tmp_path / f"EuroSAT_{top}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in files:
            zf.write(source / rel, f"{top}/{rel}" if top else rel)
    return archive, tree_digest(source)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("top", ["EuroSAT_RGB", "2750"])
def test_eurosat_download_extracts_and_verifies(tmp_path, monkeypatch, top):
    archive, digest = make_eurosat_zip(tmp_path, top)
    monkeypatch.setattr(eurosat, "EUROSAT_URLS", ((tmp_path / "missing.zip").as_uri(), archive.as_uri()))
    monkeypatch.setattr(eurosat, "EUROSAT_TREE_SHA256", digest)
    root = tmp_path / "data"
    splits = load_dataset("eurosat", root, download=True)  # first mirror fails, the second one works
    assert tree_digest(root / "eurosat" / "2750") == digest
    assert _leftovers(root / "eurosat") == ["2750"]  # no partial download or extraction folder left
    assert splits.classnames == ("Annual Crop Land", "Forest", "Sea or Lake")
    assert len(splits.train) + len(splits.val) + len(splits.test) == sum(EUROSAT_FOLDERS.values())
    # Already present: no second download even though the mirrors are gone now.
    monkeypatch.setattr(eurosat, "EUROSAT_URLS", ())
    assert load_dataset("eurosat", root, download=True).train == splits.train


def test_eurosat_download_digest_mismatch_removes_extracted_tree(tmp_path, monkeypatch):
    archive, _ = make_eurosat_zip(tmp_path, "EuroSAT_RGB")
    monkeypatch.setattr(eurosat, "EUROSAT_URLS", (archive.as_uri(),))
    monkeypatch.setattr(eurosat, "EUROSAT_TREE_SHA256", "0" * 64)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="content digest mismatch"):
        load_dataset("eurosat", root, download=True)
    assert _leftovers(root / "eurosat") == []
    with pytest.raises(DatasetNotFoundError):
        load_dataset("eurosat", root)


def test_download_refuses_archive_escaping_its_folder(tmp_path, monkeypatch):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.jpg", b"x")
    monkeypatch.setattr(eurosat, "EUROSAT_URLS", (archive.as_uri(),))
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="escapes"):
        load_dataset("eurosat", root, download=True)
    assert not (tmp_path / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    assert _leftovers(root / "eurosat") == []


def test_a_catalog_refuses_a_second_entry_under_one_key_and_names_the_known_keys():
    catalog: Catalog[int] = Catalog("widget")
    assert catalog.add("b", 2) == 2 and catalog.add("a", 1) == 1
    assert catalog.names() == ["a", "b"] and "a" in catalog and "c" not in catalog
    with pytest.raises(ValueError, match="^widget 'a' is already registered$"):
        catalog.add("a", 3)
    assert catalog.get("a") == 1  # the first entry stays
    with pytest.raises(ValueError, match="^unknown widget 'c'; available: a, b$"):
        catalog.get("c")
    with pytest.raises(ValueError, match="^register_widget expects a int, got str$"):
        Catalog("widget", int).add("s", "not an int")
    worded = Catalog("space", unknown="no space for {name!r}")
    with pytest.raises(ValueError, match="^no space for 'x'; available: $"):
        worded.get("x")
