"""The other datasets of the CoOp paper: registry entries, expected layouts and readers.

Each is laid out as CoOp's DATASETS.md describes (https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) and read
from its fixed split: a ``split_zhou_*.json`` file for most, the official split lists for FGVC-Aircraft, and the
official train/val folders for ImageNet (CoOp evaluates ImageNet on its val set, so ``val`` is ``test`` there;
its ``classnames.txt`` is optional, the package ships the same names).
Templates are CoOp's hand-crafted zero-shot prompts. None of these datasets downloads automatically. Loaders check
that the image folder and split files exist but never open the images.
"""

from __future__ import annotations

import logging
from pathlib import Path

from coop_core.datasets.base import (
    DatasetSpec,
    DatasetSplits,
    Item,
    list_images,
    make_splits,
    read_coop_split,
    readable_classname,
    register_dataset,
    require_dir,
    require_file,
)
from coop_core.datasets.data import imagenet_classnames

logger = logging.getLogger(__name__)


def load_coop_split_dataset(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """Read a dataset whose split is a CoOp ``split_zhou_*.json`` under its dataset folder.

    Raises:
        DatasetNotFoundError: If the image folder or the split file is missing.
    """
    if spec.split_file is None:
        raise ValueError(f"dataset {spec.name!r} has no split file to read")
    image_dir = require_dir(spec, root, spec.image_path(root))
    split_path = require_file(spec, root, spec.dataset_path(root) / spec.split_file)
    train, val, test = read_coop_split(split_path)
    return make_splits(spec, image_dir, train, val, test, split_source=str(split_path))


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_fgvc_aircraft(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """Read FGVC-Aircraft (variant level) from ``variants.txt`` and ``images_variant_{train,val,test}.txt``.

    Labels are line indices in ``variants.txt``; split lines are ``"<image id> <variant name>"`` for
    ``images/<image id>.jpg``.

    Raises:
        DatasetNotFoundError: If the image folder or a list file is missing.
        ValueError: If a split names a variant that ``variants.txt`` lacks.
    """
    dataset_dir = spec.dataset_path(root)
    image_dir = require_dir(spec, root, spec.image_path(root))
    variants = _read_lines(require_file(spec, root, dataset_dir / "variants.txt"))
    label_of = {name: label for label, name in enumerate(variants)}
    classnames = tuple(readable_classname(name) for name in variants)
    splits = []
    for split in ("train", "val", "test"):
        list_path = require_file(spec, root, dataset_dir / f"images_variant_{split}.txt")
        items = []
        for line in _read_lines(list_path):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise ValueError(f"{list_path}: variant {variant!r} of image {image_id} is not in variants.txt")
            label = label_of[variant]
            items.append(Item(f"{image_id}.jpg", label, classnames[label]))
        splits.append(items)
    train, val, test = splits
    return make_splits(spec, image_dir, train, val, test, classnames=classnames)


def imagenet_names(names_path: Path) -> tuple[dict[str, str], str]:
    """ImageNet's wnid -> readable name, and where the names came from (logged).

    From ``names_path`` (CoOp's ``classnames.txt``, ``"<wnid> <readable name>"`` lines) when it exists, as in CoOp;
    else the packaged list (:func:`coop_core.datasets.data.imagenet_classnames`, the same names).
    """
    if not names_path.is_file():
        logger.info("%s not found: using the packaged ImageNet class names (CLIP's, as in CoOp's classnames.txt)",
                    names_path)
        return imagenet_classnames(), "the packaged ImageNet class list"
    logger.info("ImageNet class names from %s", names_path)
    readable = {}
    for line in _read_lines(names_path):
        wnid, _, name = line.partition(" ")
        readable[wnid] = readable_classname(name or wnid)
    return readable, str(names_path)


def load_imagenet(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """Read ImageNet from ``images/train/<wnid>/`` and ``images/val/<wnid>/`` with names from :func:`imagenet_names`.

    Labels follow the sorted wnids (as CoOp's sorted folders). As in CoOp, the official val set is the test set, and
    ``val`` is that same set.

    Raises:
        DatasetNotFoundError: If ``images/train`` or ``images/val`` is missing.
        ValueError: If an image folder's wnid is not one of the class names' wnids.
    """
    image_dir = require_dir(spec, root, spec.image_path(root))
    readable, names_from = imagenet_names(spec.dataset_path(root) / "classnames.txt")
    wnids = sorted(readable)
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    classnames = tuple(readable[wnid] for wnid in wnids)
    splits = []
    for folder in ("train", "val"):
        split_dir = require_dir(spec, root, image_dir / folder)
        items = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in label_of:
                raise ValueError(f"{class_dir} is not a class listed in {names_from}; remove the folder or add its "
                                 "wnid to classnames.txt")
            label = label_of[class_dir.name]
            items += [
                Item(f"{folder}/{class_dir.name}/{name}", label, classnames[label]) for name in list_images(class_dir)
            ]
        splits.append(items)
    train, test = splits
    return make_splits(spec, image_dir, train, test, test, classnames=classnames)


_DATASETS_MD = "layout from CoOp's DATASETS.md"

CALTECH101 = register_dataset(
    DatasetSpec(
        name="caltech101",
        dataset_dir="caltech-101",
        image_dir="101_ObjectCategories",
        split_file="split_zhou_Caltech101.json",
        template="a photo of a {}.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/caltech-101/              # {_DATASETS_MD}
    101_ObjectCategories/<class>/image_0001.jpg
    split_zhou_Caltech101.json""",
    )
)

OXFORD_PETS = register_dataset(
    DatasetSpec(
        name="oxford_pets",
        dataset_dir="oxford_pets",
        image_dir="images",
        split_file="split_zhou_OxfordPets.json",
        template="a photo of a {}, a type of pet.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/oxford_pets/              # {_DATASETS_MD}
    images/Abyssinian_1.jpg ...
    annotations/
    split_zhou_OxfordPets.json""",
    )
)

STANFORD_CARS = register_dataset(
    DatasetSpec(
        name="stanford_cars",
        dataset_dir="stanford_cars",
        image_dir="",
        split_file="split_zhou_StanfordCars.json",
        template="a photo of a {}.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/stanford_cars/            # {_DATASETS_MD}; split paths are relative to this folder
    cars_train/00001.jpg ...
    cars_test/00001.jpg ...
    devkit/
    split_zhou_StanfordCars.json""",
    )
)

OXFORD_FLOWERS = register_dataset(
    DatasetSpec(
        name="oxford_flowers",
        dataset_dir="oxford_flowers",
        image_dir="jpg",
        split_file="split_zhou_OxfordFlowers.json",
        template="a photo of a {}, a type of flower.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/oxford_flowers/           # {_DATASETS_MD}
    jpg/image_00001.jpg ...
    cat_to_name.json
    imagelabels.mat
    split_zhou_OxfordFlowers.json""",
    )
)

FOOD101 = register_dataset(
    DatasetSpec(
        name="food101",
        dataset_dir="food-101",
        image_dir="images",
        split_file="split_zhou_Food101.json",
        template="a photo of {}, a type of food.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/food-101/                 # {_DATASETS_MD}
    images/<class>/<id>.jpg
    meta/
    split_zhou_Food101.json""",
    )
)

SUN397 = register_dataset(
    DatasetSpec(
        name="sun397",
        dataset_dir="sun397",
        image_dir="SUN397",
        split_file="split_zhou_SUN397.json",
        template="a photo of a {}.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/sun397/                   # {_DATASETS_MD}
    SUN397/a/abbey/sun_*.jpg ...
    split_zhou_SUN397.json""",
    )
)

DTD = register_dataset(
    DatasetSpec(
        name="dtd",
        dataset_dir="dtd",
        image_dir="images",
        split_file="split_zhou_DescribableTextures.json",
        template="{} texture.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/dtd/                      # {_DATASETS_MD}
    images/<texture>/<texture>_0001.jpg
    imdb/
    labels/
    split_zhou_DescribableTextures.json""",
    )
)

UCF101 = register_dataset(
    DatasetSpec(
        name="ucf101",
        dataset_dir="ucf101",
        image_dir="UCF-101-midframes",
        split_file="split_zhou_UCF101.json",
        template="a photo of a person doing {}.",
        loader=load_coop_split_dataset,
        layout=f"""\
<root>/ucf101/                   # {_DATASETS_MD}
    UCF-101-midframes/<Action>/v_<Action>_g01_c01.jpg
    split_zhou_UCF101.json""",
    )
)

FGVC_AIRCRAFT = register_dataset(
    DatasetSpec(
        name="fgvc_aircraft",
        dataset_dir="fgvc_aircraft",
        image_dir="images",
        split_file=None,
        template="a photo of a {}, a type of aircraft.",
        loader=load_fgvc_aircraft,
        layout=f"""\
<root>/fgvc_aircraft/            # {_DATASETS_MD}: the contents of fgvc-aircraft-2013b/data/
    images/<image id>.jpg
    variants.txt                 # one variant name per line (label = line index)
    images_variant_train.txt     # "<image id> <variant name>" per line
    images_variant_val.txt
    images_variant_test.txt""",
    )
)

IMAGENET = register_dataset(
    DatasetSpec(
        name="imagenet",
        dataset_dir="imagenet",
        image_dir="images",
        split_file=None,
        template="a photo of a {}.",
        loader=load_imagenet,
        layout=f"""\
<root>/imagenet/                 # {_DATASETS_MD}
    images/train/<wnid>/*.JPEG   # 1,000 folders like n01440764
    images/val/<wnid>/*.JPEG     # the official val set, sorted into class folders (used as test)
    classnames.txt               # optional: "<wnid> <readable name>" per line (else the packaged names)""",
    )
)
