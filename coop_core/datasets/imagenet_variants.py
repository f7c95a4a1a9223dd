"""ImageNet's distribution-shift test sets for CoOp's domain-generalisation study: -V2, -Sketch, -A and -R.

A context is learned on ImageNet and evaluated, unchanged, on these. They have no training split (their spec is
``evaluation_only``): ``train`` and ``val`` are empty and ``test`` holds every image, as CoOp evaluates them. The
layouts are CoOp's DATASETS.md. Class lists come from the package (:mod:`coop_core.datasets.data`), names from
ImageNet's (a ``classnames.txt`` in the dataset folder wins, as in CoOp), so:

- V2 and Sketch have ImageNet's 1,000 classes with ImageNet's labels (V2's folder ``k`` is ImageNet's label ``k``);
- A and R have 200 classes, their sorted wnids (label = index among them) with ImageNet's names for those wnids, so a
  class-specific context learned on ImageNet maps onto them by class name (:func:`coop_core.transfer.transfer_context`).

Loaders list folders and files but never open an image. None of these datasets downloads automatically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from coop_core.datasets.base import (
    DatasetSpec,
    DatasetSplits,
    Item,
    list_images,
    register_dataset,
    require_dir,
)
from coop_core.datasets.catalog import imagenet_names
from coop_core.datasets.data import imagenet_a_wnids, imagenet_r_wnids

_DATASETS_MD = "layout from CoOp's DATASETS.md"
_TEMPLATE = "a photo of a {}."  # CoOp evaluates the variants with ImageNet's template


def _class_dirs(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _test_only(spec: DatasetSpec, image_dir: Path, classnames: Sequence[str], label_of: Mapping[str, int],
               what: str) -> DatasetSplits:
    """Every image of the class folders under ``image_dir`` as the test split; ``label_of`` maps a folder name to a
    label, ``what`` names the class list in the error for a folder that is not in it."""
    test = []
    for class_dir in _class_dirs(image_dir):
        if class_dir.name not in label_of:
            raise ValueError(f"{class_dir} is not one of the {len(classnames)} classes of {spec.name} ({what}); "
                             f"remove the folder, or check that {image_dir} is {spec.name}'s image folder")
        label = label_of[class_dir.name]
        test += [Item(f"{class_dir.name}/{name}", label, classnames[label]) for name in list_images(class_dir)]
    return DatasetSplits(name=spec.name, image_dir=image_dir, classnames=classnames, template=spec.template, train=(),
                         val=(), test=test, split_source=f"every image under {image_dir} (evaluation only)")


def load_imagenet_v2(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """ImageNet-V2 (matched frequency): folder ``k`` holds images of ImageNet's label ``k`` (its k-th sorted wnid).

    Raises:
        DatasetNotFoundError: If the image folder is missing.
        ValueError: If a folder is not a label ``0..999``.
    """
    image_dir = require_dir(spec, root, spec.image_path(root))
    readable, source = imagenet_names(spec.dataset_path(root) / "classnames.txt")
    classnames = tuple(readable[wnid] for wnid in sorted(readable))
    label_of = {str(label): label for label in range(len(classnames))}
    return _test_only(spec, image_dir, classnames, label_of, f"folders 0..{len(classnames) - 1}, names from {source}")


def load_imagenet_sketch(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """ImageNet-Sketch: ``images/<wnid>/``, ImageNet's 1,000 classes and labels.

    Raises:
        DatasetNotFoundError: If the image folder is missing.
        ValueError: If a folder is not an ImageNet wnid.
    """
    image_dir = require_dir(spec, root, spec.image_path(root))
    readable, source = imagenet_names(spec.dataset_path(root) / "classnames.txt")
    wnids = sorted(readable)
    return _test_only(spec, image_dir, tuple(readable[w] for w in wnids), {w: i for i, w in enumerate(wnids)},
                      f"ImageNet's wnids from {source}")


def _load_imagenet_subset(root: Path, spec: DatasetSpec, wnids: Sequence[str]) -> DatasetSplits:
    """A 200-class ImageNet subset (A or R): labels index the sorted ``wnids``, names are ImageNet's."""
    image_dir = require_dir(spec, root, spec.image_path(root))
    readable, source = imagenet_names(spec.dataset_path(root) / "classnames.txt")
    unnamed = [w for w in wnids if w not in readable]
    if unnamed:
        raise ValueError(f"{source} has no name for {len(unnamed)} of {spec.name}'s classes (first: {unnamed[0]}); "
                         "use ImageNet's classnames.txt (all 1,000 wnids) or remove the file to use the packaged names")
    return _test_only(spec, image_dir, tuple(readable[w] for w in wnids), {w: i for i, w in enumerate(wnids)},
                      f"the packaged list of its {len(wnids)} wnids")


def load_imagenet_a(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """ImageNet-A: ``imagenet-a/<wnid>/``, the 200 classes of :func:`~coop_core.datasets.data.imagenet_a_wnids`
    (its ``README.txt`` is not a folder and is ignored).

    Raises:
        DatasetNotFoundError: If the image folder is missing.
        ValueError: If a folder is not one of the 200 wnids.
    """
    return _load_imagenet_subset(root, spec, imagenet_a_wnids())


def load_imagenet_r(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """ImageNet-R: ``imagenet-r/<wnid>/``, the 200 classes of :func:`~coop_core.datasets.data.imagenet_r_wnids`.

    Raises:
        DatasetNotFoundError: If the image folder is missing.
        ValueError: If a folder is not one of the 200 wnids.
    """
    return _load_imagenet_subset(root, spec, imagenet_r_wnids())


_NAMES = 'classnames.txt               # optional: ImageNet\'s "<wnid> <name>" lines (else the packaged names)'

IMAGENET_V2 = register_dataset(
    DatasetSpec(
        name="imagenet_v2",
        dataset_dir="imagenetv2",
        image_dir="imagenetv2-matched-frequency-format-val",
        split_file=None,
        template=_TEMPLATE,
        loader=load_imagenet_v2,
        layout=f"""\
<root>/imagenetv2/               # {_DATASETS_MD}; evaluation only
    imagenetv2-matched-frequency-format-val/<label>/*.jpeg   # folders 0..999: ImageNet's label k
    {_NAMES}""",
        evaluation_only=True,
        train_dataset="imagenet",
    )
)

IMAGENET_SKETCH = register_dataset(
    DatasetSpec(
        name="imagenet_sketch",
        dataset_dir="imagenet-sketch",
        image_dir="images",
        split_file=None,
        template=_TEMPLATE,
        loader=load_imagenet_sketch,
        layout=f"""\
<root>/imagenet-sketch/          # {_DATASETS_MD}; evaluation only
    images/<wnid>/*.JPEG         # 1,000 folders like n01440764
    {_NAMES}""",
        evaluation_only=True,
        train_dataset="imagenet",
    )
)

IMAGENET_A = register_dataset(
    DatasetSpec(
        name="imagenet_a",
        dataset_dir="imagenet-adversarial",
        image_dir="imagenet-a",
        split_file=None,
        template=_TEMPLATE,
        loader=load_imagenet_a,
        layout=f"""\
<root>/imagenet-adversarial/     # {_DATASETS_MD}; evaluation only
    imagenet-a/<wnid>/*.jpg      # 200 folders like n01498041 (and README.txt)
    {_NAMES}""",
        evaluation_only=True,
        train_dataset="imagenet",
    )
)

IMAGENET_R = register_dataset(
    DatasetSpec(
        name="imagenet_r",
        dataset_dir="imagenet-rendition",
        image_dir="imagenet-r",
        split_file=None,
        template=_TEMPLATE,
        loader=load_imagenet_r,
        layout=f"""\
<root>/imagenet-rendition/       # {_DATASETS_MD}; evaluation only
    imagenet-r/<wnid>/*.jpg      # 200 folders like n01443537
    {_NAMES}""",
        evaluation_only=True,
        train_dataset="imagenet",
    )
)

# CoOp's domain-generalisation targets of a model trained on ImageNet, in the paper's order.
DG_TARGETS = (IMAGENET_V2.name, IMAGENET_SKETCH.name, IMAGENET_A.name, IMAGENET_R.name)
