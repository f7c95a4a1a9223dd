"""Class lists shipped with the package: ImageNet's 1,000 wnids with CLIP's readable names, and the 200-wnid subsets
of ImageNet-A and ImageNet-R (provenance and licenses in this folder's README.md).

They let ImageNet and its variants load without a ``classnames.txt``, and give ImageNet-A/-R ImageNet's names for
their classes, so a context learned on ImageNet maps onto them by class name.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

IMAGENET_CLASSNAMES_FILE = "imagenet_classnames.txt"
IMAGENET_A_WNIDS_FILE = "imagenet_a_wnids.txt"
IMAGENET_R_WNIDS_FILE = "imagenet_r_wnids.txt"


@cache
def _lines(filename: str) -> tuple[str, ...]:
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def imagenet_classnames() -> dict[str, str]:
    """ImageNet's wnid -> readable name, in sorted-wnid (= label) order; the names CoOp's ``classnames.txt`` holds."""
    return dict(line.split(" ", 1) for line in _lines(IMAGENET_CLASSNAMES_FILE))


def imagenet_a_wnids() -> tuple[str, ...]:
    """The 200 sorted wnids of ImageNet-A (label = index)."""
    return _lines(IMAGENET_A_WNIDS_FILE)


def imagenet_r_wnids() -> tuple[str, ...]:
    """The 200 sorted wnids of ImageNet-R (label = index)."""
    return _lines(IMAGENET_R_WNIDS_FILE)
