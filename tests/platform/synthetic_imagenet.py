"""Synthetic ImageNet and its four distribution-shift test sets in CoOp's layouts (DATASETS.md), with the real class
lists: every wnid folder of the packaged lists, each holding symlinks to a few real EuroSAT JPEGs.

The images say nothing about the classes; what is tested is the plumbing: folder layouts, the class lists, the label
mapping (V2's folder ``k`` is ImageNet's label ``k``; A/R are 200-wnid subsets) and the test counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from coop_core.datasets import imagenet_a_wnids, imagenet_classnames, imagenet_r_wnids

# Image folder of each evaluation-only variant under the data root.
VARIANT_DIRS = {
    "imagenet_v2": "imagenetv2/imagenetv2-matched-frequency-format-val",
    "imagenet_sketch": "imagenet-sketch/images",
    "imagenet_a": "imagenet-adversarial/imagenet-a",
    "imagenet_r": "imagenet-rendition/imagenet-r",
}


def _link(images: Sequence[Path], folder: Path, n: int, start: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.symlink(images[(start + i) % len(images)], folder / f"img{i}.jpg")
    return start + n


def build_imagenet_root(root: Path, images: Sequence[Path], *, variant_classes: dict[str, int]) -> dict[str, int]:
    """Write ``root/imagenet`` (1 train and 1 val image for each of the 1,000 wnids) and the four variants.

    Args:
        root: the data root to write (``--data-root``).
        images: real JPEGs to link to, cycled through.
        variant_classes: per variant name, how many of its class folders (in sorted order) get one image; the
            other folders of its class list are left out, as a partial download would.

    Returns:
        The number of test images written per variant.
    """
    wnids = list(imagenet_classnames())
    k = 0
    for split in ("train", "val"):
        for wnid in wnids:
            k = _link(images, root / "imagenet" / "images" / split / wnid, 1, k)
    folders = {"imagenet_v2": [str(label) for label in range(len(wnids))], "imagenet_sketch": wnids,
               "imagenet_a": list(imagenet_a_wnids()), "imagenet_r": list(imagenet_r_wnids())}
    counts = {}
    for name, n in variant_classes.items():
        for folder in folders[name][:n]:
            k = _link(images, root / VARIANT_DIRS[name] / folder, 1, k)
        counts[name] = n
    (root / VARIANT_DIRS["imagenet_a"] / "README.txt").write_text("ImageNet-A\n")  # as shipped: not a class
    return counts
