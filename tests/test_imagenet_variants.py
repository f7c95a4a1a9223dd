"""ImageNet-V2/-Sketch/-A/-R on synthetic trees in CoOp's layouts, with the real packaged class lists."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from coop_core.datasets import (
    DatasetNotFoundError,
    get_dataset_spec,
    imagenet_a_wnids,
    imagenet_classnames,
    imagenet_r_wnids,
    load_dataset,
)
from coop_core.datasets.base import check_every_class_has_training_images

VARIANTS = {  # name: (image folder under the root, suffix)
    "imagenet_v2": ("imagenetv2/imagenetv2-matched-frequency-format-val", ".jpeg"),
    "imagenet_sketch": ("imagenet-sketch/images", ".JPEG"),
    "imagenet_a": ("imagenet-adversarial/imagenet-a", ".jpg"),
    "imagenet_r": ("imagenet-rendition/imagenet-r", ".jpg"),
}


def write_images(folder: Path, n: int, suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(folder / f"img{i}{suffix}", format="JPEG")


def test_packaged_class_lists_are_imagenets():
    names = imagenet_classnames()
    wnids = list(names)
    assert len(names) == 1000 and wnids == sorted(wnids)
    assert list(names.items())[:3] == [("n01440764", "tench"), ("n01443537", "goldfish"),
                                       ("n01484850", "great white shark")]
    assert names["n04592741"] == "airplane wing" and wnids[-1] == "n15075141" and names["n15075141"] == "toilet paper"
    for subset in (imagenet_a_wnids(), imagenet_r_wnids()):
        assert len(subset) == 200 and list(subset) == sorted(subset) and set(subset) <= set(names)
    assert imagenet_a_wnids() != imagenet_r_wnids()


@pytest.mark.parametrize(("name", "n_cls"), [("imagenet_v2", 1000), ("imagenet_sketch", 1000), ("imagenet_a", 200),
                                             ("imagenet_r", 200)])
def test_variants_are_test_only_with_imagenets_names(tmp_path, name, n_cls):
    folder, suffix = VARIANTS[name]
    names = imagenet_classnames()
    wnids = list(names)
    subset = {"imagenet_a": imagenet_a_wnids(), "imagenet_r": imagenet_r_wnids()}.get(name, tuple(wnids))
    picked = [subset[0], subset[7], subset[-1]]
    for wnid in picked:
        write_images(tmp_path / folder / (str(wnids.index(wnid)) if name == "imagenet_v2" else wnid), 2, suffix)
    if name == "imagenet_a":
        (tmp_path / folder / "README.txt").write_text("ImageNet-A")

    splits = load_dataset(name, tmp_path)
    assert len(splits.classnames) == n_cls
    assert splits.classnames == tuple(names[w] for w in subset)  # A/R: ImageNet's names of their 200 wnids
    assert splits.train == () and splits.val == ()
    assert len(splits.test) == 6
    assert {(it.label, it.classname) for it in splits.test} == {(subset.index(w), names[w]) for w in picked}
    assert splits.image_dir == (tmp_path / folder).resolve()
    assert all((splits.image_dir / it.path).is_file() for it in splits.test)
    assert get_dataset_spec(name).evaluation_only and get_dataset_spec(name).train_dataset == "imagenet"


def test_v2_folder_k_is_imagenets_label_k(tmp_path):
    write_images(tmp_path / VARIANTS["imagenet_v2"][0] / "417", 1, ".jpeg")
    splits = load_dataset("imagenet_v2", tmp_path)
    (item,) = splits.test
    assert item.path == "417/img0.jpeg" and item.label == 417
    assert item.classname == list(imagenet_classnames().values())[417] == "balloon"


def test_a_classnames_txt_in_the_dataset_folder_wins(tmp_path, caplog):
    folder = tmp_path / VARIANTS["imagenet_sketch"][0]
    write_images(folder / "n01443537", 1, ".JPEG")
    (tmp_path / "imagenet-sketch" / "classnames.txt").write_text("n01440764 tench fish\nn01443537 gold fish\n")
    with caplog.at_level(logging.INFO, logger="coop_core.datasets.catalog"):
        splits = load_dataset("imagenet_sketch", tmp_path)
    assert splits.classnames == ("tench fish", "gold fish")
    assert splits.test[0].label == 1 and splits.test[0].classname == "gold fish"
    assert "classnames.txt" in caplog.text


def test_imagenet_without_classnames_txt_uses_the_packaged_names(tmp_path, caplog):
    for folder in ("train", "val"):
        write_images(tmp_path / "imagenet" / "images" / folder / "n01443537", 1, ".JPEG")
    with caplog.at_level(logging.INFO, logger="coop_core.datasets.catalog"):
        splits = load_dataset("imagenet", tmp_path)
    assert len(splits.classnames) == 1000 and splits.classnames[1] == "goldfish"
    assert [(it.path, it.label) for it in splits.train] == [("train/n01443537/img0.JPEG", 1)]
    assert "packaged ImageNet class names" in caplog.text


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_training_on_a_variant_is_refused_with_the_fix(tmp_path, name):
    folder, suffix = VARIANTS[name]
    wnid = imagenet_a_wnids()[0] if name != "imagenet_r" else imagenet_r_wnids()[0]
    write_images(tmp_path / folder / ("0" if name == "imagenet_v2" else wnid), 1, suffix)
    splits = load_dataset(name, tmp_path)
    with pytest.raises(ValueError) as err:
        check_every_class_has_training_images(splits)
    assert str(err.value).startswith(f"{name} is an evaluation-only dataset (no training split): train on imagenet "
                                     "and evaluate on it")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_missing_variant_shows_its_layout(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, tmp_path)
    message = str(err.value)
    assert f"{VARIANTS[name][0]} does not exist" in message
    assert VARIANTS[name][0].split("/")[1] in get_dataset_spec(name).layout
    assert get_dataset_spec(name).layout.splitlines()[1].strip() in message
    assert "There is no automatic download" in message


@pytest.mark.parametrize(("name", "folder_name"), [("imagenet_a", "n01440764"), ("imagenet_r", "n99999999"),
                                                   ("imagenet_sketch", "n99999999"), ("imagenet_v2", "1000")])
def test_a_folder_outside_the_class_list_is_refused(tmp_path, name, folder_name):
    folder, suffix = VARIANTS[name]
    write_images(tmp_path / folder / folder_name, 1, suffix)
    with pytest.raises(ValueError, match=f"{folder_name} is not one of the (1000|200) classes of {name}.*remove the "
                                         "folder"):
        load_dataset(name, tmp_path)
