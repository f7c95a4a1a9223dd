"""Dataset types, the dataset registry, CoOp split files and the image dataset used by the loops.

A dataset is described by a :class:`DatasetSpec` (where its files live under the data root, CoOp's hand-crafted
template, and a loader) registered under a lowercase key equal to the CLI value. Loading returns a
:class:`DatasetSplits`: plain, frozen lists of :class:`Item` (a relative image path, a label and the readable class
name), so few-shot sampling, caching and hashing never need to touch images.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import torch.utils.data
from PIL import Image

from coop_core.catalog import Catalog

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
_KEY_RE = re.compile(r"[a-z0-9_]+")


def readable_classname(name: str) -> str:
    """CoOp's class-name clean-up: underscores become spaces (``"american_bulldog"`` -> ``"american bulldog"``)."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class Item:
    """One labelled image.

    path: image path relative to :attr:`DatasetSplits.image_dir`, POSIX separators.
    label: class index, ``DatasetSplits.classnames[label]`` is its name.
    classname: readable class name (underscores already replaced by spaces).
    """

    path: str
    label: int
    classname: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"Item.path must be a non-empty relative path, got {self.path!r}")
        if "\\" in self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError(f"Item.path must be relative (no '..') with POSIX separators, got {self.path!r}")
        if not isinstance(self.label, numbers.Integral) or isinstance(self.label, bool) or self.label < 0:
            raise ValueError(f"Item.label must be a non-negative integer, got {self.label!r}")
        object.__setattr__(self, "label", int(self.label))  # numpy / Arrow integers become plain ints
        if not isinstance(self.classname, str) or not self.classname:
            raise ValueError(f"Item.classname must be a non-empty string, got {self.classname!r}")


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset: class names, zero-shot template and the train/val/test items.

    name: registry key of the dataset. image_dir: absolute folder that item paths are relative to.
    classnames: readable names, index == label. template: hand-crafted zero-shot prompt with one ``{}``.
    split_source: where the split came from (a split file's name or path), for logs and run records; None when the
    loader does not say. It is left out of equality: the same items from another copy of a split are the same
    dataset, and no cache key (``fewshot.source_hash``, ``features.items_digest``) reads it.
    """

    name: str
    image_dir: Path
    classnames: tuple[str, ...]
    template: str
    train: tuple[Item, ...]
    val: tuple[Item, ...]
    test: tuple[Item, ...]
    split_source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.image_dir, (str, Path)) or not Path(self.image_dir).is_absolute():
            raise ValueError(f"DatasetSplits.image_dir must be an absolute path, got {self.image_dir!r}")
        object.__setattr__(self, "image_dir", Path(self.image_dir))
        for attr in ("classnames", *SPLIT_NAMES):  # accept any sequence, store tuples (hashable, immutable)
            value = getattr(self, attr)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"DatasetSplits.{attr} must be a sequence, got {type(value).__name__}")
            object.__setattr__(self, attr, tuple(value))
        if not self.classnames:
            raise ValueError(f"dataset {self.name!r} has no classes")
        _check_template(self.template)
        if self.split_source is not None and (not isinstance(self.split_source, str) or not self.split_source):
            raise ValueError(f"DatasetSplits.split_source must be a non-empty string or None, got "
                             f"{self.split_source!r}")
        n_cls = len(self.classnames)
        for split in SPLIT_NAMES:
            for item in getattr(self, split):
                if not isinstance(item, Item):
                    raise ValueError(f"DatasetSplits.{split} must hold Item objects, got {type(item).__name__}")
                if item.label >= n_cls:
                    raise ValueError(
                        f"{split} item {item.path!r} has label {item.label} but the dataset has {n_cls} classes"
                    )
                if item.classname != self.classnames[item.label]:
                    raise ValueError(
                        f"{split} item {item.path!r} is named {item.classname!r} but label {item.label} is "
                        f"{self.classnames[item.label]!r}"
                    )

    def split(self, name: str) -> tuple[Item, ...]:
        """The items of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how to read it.

    name: lowercase registry key == CLI value. dataset_dir: folder under the data root. image_dir: image folder under
    ``dataset_dir`` ("" when split paths are relative to ``dataset_dir`` itself). split_file: CoOp split JSON under
    ``dataset_dir`` or None. template: CoOp's hand-crafted prompt. loader: ``loader(root, spec)`` reads the data root.
    layout: the expected directory layout, shown in errors. download: optional ``download(root, spec)`` fetching the
    images into place (opt-in only). evaluation_only: the dataset has no training split (an ImageNet variant, used as
    a test set only); train_dataset: for such a dataset, the registry key to train on instead (named in the refusal).
    """

    name: str
    dataset_dir: str
    image_dir: str
    split_file: str | None
    template: str
    loader: Callable[[Path, DatasetSpec], DatasetSplits]
    layout: str
    download: Callable[[Path, DatasetSpec], Any] | None = None
    evaluation_only: bool = False
    train_dataset: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _KEY_RE.fullmatch(self.name):
            raise ValueError(f"dataset key must be lowercase [a-z0-9_]+, got {self.name!r}")
        if not self.dataset_dir or Path(self.dataset_dir).is_absolute():
            raise ValueError(f"dataset_dir must be a folder name relative to the data root, got {self.dataset_dir!r}")
        if Path(self.image_dir).is_absolute():
            raise ValueError(f"image_dir must be relative to dataset_dir, got {self.image_dir!r}")
        _check_template(self.template)
        if not callable(self.loader):
            raise ValueError(f"loader of dataset {self.name!r} must be callable")
        if self.download is not None and not callable(self.download):
            raise ValueError(f"download of dataset {self.name!r} must be callable or None")
        if not self.layout.strip():
            raise ValueError(f"dataset {self.name!r} needs a layout description for its error messages")
        if not isinstance(self.evaluation_only, bool):
            raise ValueError(f"evaluation_only of dataset {self.name!r} must be True or False")
        if self.evaluation_only != (self.train_dataset is not None):
            raise ValueError(f"dataset {self.name!r}: an evaluation-only dataset names the train_dataset to train on "
                             "instead, and only such a dataset does; set both or neither")
        if self.train_dataset is not None and not _KEY_RE.fullmatch(self.train_dataset):
            raise ValueError(f"train_dataset of {self.name!r} must be a registry key, got {self.train_dataset!r}")

    def dataset_path(self, root: Path) -> Path:
        """``<root>/<dataset_dir>``."""
        return Path(root) / self.dataset_dir

    def image_path(self, root: Path) -> Path:
        """``<root>/<dataset_dir>/<image_dir>``."""
        return self.dataset_path(root) / self.image_dir if self.image_dir else self.dataset_path(root)


def _check_template(template: str) -> None:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {template!r}")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the loader expects them; the message says what to put where."""

    @classmethod
    def for_spec(cls, spec: DatasetSpec, root: Path, missing: Path) -> DatasetNotFoundError:
        """Error for ``spec`` whose ``missing`` path under ``root`` does not exist."""
        if spec.download is not None:
            how = (
                f"Download the images with --download (load_dataset({spec.name!r}, root, download=True)), "
                f"or prepare them by hand as described in CoOp's DATASETS.md: {COOP_DATASETS_URL}"
            )
        else:
            how = f"There is no automatic download for {spec.name!r}; prepare it as described in CoOp's DATASETS.md: "
            how += COOP_DATASETS_URL
        message = (
            f"dataset {spec.name!r} not found: {missing} does not exist.\n"
            f"Expected layout under the data root {root}:\n{spec.layout.rstrip()}\n{how}"
        )
        return cls(message)


# The registry: explicit, filled by the modules imported in ``coop_core.datasets.__init__``.
_DATASETS: Catalog[DatasetSpec] = Catalog("dataset", DatasetSpec)


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Raises:
        ValueError: If the key is already registered (keys are validated by :class:`DatasetSpec`).
    """
    return _DATASETS.add(getattr(spec, "name", None), spec)


def list_datasets() -> list[str]:
    """Registered dataset keys, sorted."""
    return _DATASETS.names()


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered spec for ``name``.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the registered datasets.
    """
    return _DATASETS.get(name)


def load_dataset(name: str, root: str | Path, *, download: bool = False) -> DatasetSplits:
    """Load dataset ``name`` from the data root ``root``.

    Args:
        name: Registry key, e.g. ``"eurosat"``.
        root: Data root holding ``<dataset_dir>/`` folders (as in CoOp's DATASETS.md).
        download: Fetch the images first if they are missing and the dataset supports it. Off by default: loading
            never touches the network unless asked.

    Raises:
        ValueError: Unknown dataset.
        DatasetNotFoundError: The files are missing (and were not downloaded).
    """
    spec = get_dataset_spec(name)
    root = Path(root).expanduser().resolve()
    if download and not spec.image_path(root).is_dir():
        if spec.download is None:
            raise DatasetNotFoundError.for_spec(spec, root, spec.image_path(root))
        logger.info("downloading dataset %r into %s", name, spec.dataset_path(root))
        spec.download(root, spec)
    return spec.loader(root, spec)


def require_dir(spec: DatasetSpec, root: Path, path: Path) -> Path:
    """Return ``path`` if it is a directory, else raise :class:`DatasetNotFoundError` with ``spec``'s layout."""
    if not path.is_dir():
        raise DatasetNotFoundError.for_spec(spec, root, path)
    return path


def require_file(spec: DatasetSpec, root: Path, path: Path) -> Path:
    """Return ``path`` if it is a file, else raise :class:`DatasetNotFoundError` with ``spec``'s layout."""
    if not path.is_file():
        raise DatasetNotFoundError.for_spec(spec, root, path)
    return path


def _normalise_path(path: str) -> str:
    path = path.replace("\\", "/")
    if path and "//" not in path and not path.endswith("/") and "/./" not in f"/{path}/":
        return path  # already what PurePosixPath.as_posix() gives (the split files' paths): 50x faster per item
    return PurePosixPath(path).as_posix()


def read_coop_split(path: Path) -> tuple[list[Item], list[Item], list[Item]]:
    """Read a CoOp split JSON (``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}``).

    Class names are made readable (underscores -> spaces), so ``item.classname`` equals the dataset's
    ``classnames[item.label]``.

    Raises:
        ValueError: If the file is not valid JSON of that shape.
    """
    path = Path(path)
    fix = f"replace it with CoOp's split file ({COOP_DATASETS_URL})"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, Mapping) or any(split not in data for split in SPLIT_NAMES):
        raise ValueError(f"{path} must be a JSON object with keys {SPLIT_NAMES}; {fix}")
    splits: list[list[Item]] = []
    for split in SPLIT_NAMES:
        items = []
        if not isinstance(data[split], list):
            raise ValueError(f"{path}: {split!r} must be a list of [relpath, label, classname]; {fix}")
        for i, entry in enumerate(data[split]):
            if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 3:
                raise ValueError(f"{path}: {split}[{i}] must be [relpath, label, classname], got {entry!r}; {fix}")
            relpath, label, classname = entry
            if not isinstance(relpath, str) or not isinstance(classname, str):
                raise ValueError(f"{path}: {split}[{i}] must be [relpath, label, classname], got {entry!r}; {fix}")
            clean = _normalise_path(relpath)
            if clean.startswith("/") or ".." in clean.split("/"):
                raise ValueError(f"{path}: {split}[{i}] names {relpath!r}, outside the image folder: split paths are "
                                 f"relative to it, with no '..' and no leading '/'; fix the entry or {fix}")
            try:
                items.append(Item(clean, label, readable_classname(classname)))
            except ValueError as err:
                raise ValueError(f"{path}: {split}[{i}]: {err}; {fix}") from None
        splits.append(items)
    train, val, test = splits
    return train, val, test


def classnames_from_items(*splits: Sequence[Item]) -> tuple[str, ...]:
    """The class-name table (index == label) implied by items.

    Raises:
        ValueError: If a label has two names, two labels share a name, or labels are not ``0..n-1``.
    """
    names: dict[int, str] = {}
    for items in splits:
        for item in items:
            known = names.setdefault(item.label, item.classname)
            if known != item.classname:
                raise ValueError(f"label {item.label} has two class names: {known!r} and {item.classname!r}")
    if not names:
        raise ValueError("no items: cannot derive class names")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise ValueError(f"labels must be 0..{max(names)}, but {missing[:10]} have no items")
    table = tuple(names[label] for label in range(len(names)))
    if len(set(table)) != len(table):
        raise ValueError("two labels share a class name")
    return table


def check_every_class_has_training_images(splits: DatasetSplits) -> None:
    """Refuse a dataset with a class that has no training images (CoOp could never learn to name it).

    An evaluation-only dataset (an ImageNet variant) has no training split at all; it is refused with its own line,
    since the fix is another dataset rather than more images.

    Raises:
        ValueError: naming the class and the fix.
    """
    spec = _DATASETS.get(splits.name) if splits.name in _DATASETS else None
    if spec is not None and spec.evaluation_only:
        raise ValueError(
            f"{splits.name} is an evaluation-only dataset (no training split): train on {spec.train_dataset} and "
            f"evaluate on it (python -m platform.evaluate ... / a study's --protocol dg)"
        )
    if len(splits.classnames) < 2:
        only = f" ({splits.classnames[0]!r})" if splits.classnames else ""
        raise ValueError(
            f"{splits.name} has {len(splits.classnames)} class{only}: CoOp classifies an image as the class whose "
            "prompt matches it best, so it needs at least 2 (one class scores 100 % on anything); add the other "
            "classes' images (one sub-folder per class)"
        )
    present = {item.label for item in splits.train}
    empty = [name for label, name in enumerate(splits.classnames) if label not in present]
    if empty:
        raise ValueError(
            f"{len(empty)} class(es) of {splits.name} have no training images (first: {empty[0]!r}): every class "
            f"needs at least one; add its images to the train split (or remove the class from the split file)"
        )


def missing_images(image_dir: Path, items: Sequence[Item]) -> list[Item]:
    """The items whose image file does not exist under ``image_dir`` (one ``stat`` each, no decoding)."""
    return [item for item in items if not (image_dir / item.path).is_file()]


def check_images_exist(splits: DatasetSplits, items: Sequence[Item]) -> None:
    """Refuse a run whose split names image files that are not there (a split file for another copy of the data).

    Raises:
        ValueError: how many are missing, the first one, and the fix.
    """
    missing = missing_images(splits.image_dir, items)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(items)} images the run needs are not under {splits.image_dir} (first: "
            f"{missing[0].path!r}): the split file does not match the images there; check --data-root, or use the "
            f"split file that came with these images"
        )


def list_images(directory: Path) -> list[str]:
    """Sorted names of the non-hidden image files directly in ``directory``."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def split_per_class(
    classes: Sequence[tuple[str, str, Sequence[str]]],
    *,
    p_train: float = 0.5,
    p_val: float = 0.2,
    seed: int = 1,
) -> tuple[list[Item], list[Item], list[Item]]:
    """Deterministic stratified train/val/test split, class by class: the one splitter every loader uses.

    Mirrors CoOp's ``read_and_split_data``: each class's images are shuffled and cut into ``round(n * p_train)``
    train, ``round(n * p_val)`` val and the rest test. Unlike CoOp, each class's paths are sorted first and one local
    ``random.Random(seed)`` is drawn from in label order, so the split depends only on the images, labels and seed,
    never on the order a filesystem or a manifest lists them in.

    Args:
        classes: ``(readable name, what to call the class in errors, image paths)`` per class, index == label.
        p_train: Fraction of each class for training.
        p_val: Fraction of each class for validation; the rest is test.
        seed: Seed of the local RNG.

    Raises:
        ValueError: If the fractions are invalid or a class is too small to give every split at least one image.
    """
    if not (0 < p_train < 1 and 0 < p_val < 1 and p_train + p_val < 1):
        raise ValueError(f"need 0 < p_train, p_val and p_train + p_val < 1, got {p_train}, {p_val}")
    rng = random.Random(seed)
    train: list[Item] = []
    val: list[Item] = []
    test: list[Item] = []
    for label, (name, where, paths) in enumerate(classes):
        images = sorted(paths)
        rng.shuffle(images)
        n_train = round(len(images) * p_train)
        n_val = round(len(images) * p_val)
        if n_train < 1 or n_val < 1 or len(images) - n_train - n_val < 1:
            raise ValueError(f"{where} has {len(images)} images: too few to split into train/val/test; add images "
                             "(3 or more) or remove the class")
        train += [Item(p, label, name) for p in images[:n_train]]
        val += [Item(p, label, name) for p in images[n_train : n_train + n_val]]
        test += [Item(p, label, name) for p in images[n_train + n_val :]]
    return train, val, test


def split_image_folder(
    image_dir: Path,
    *,
    p_train: float = 0.5,
    p_val: float = 0.2,
    seed: int = 1,
    new_classnames: Mapping[str, str] | None = None,
) -> tuple[list[Item], list[Item], list[Item]]:
    """Deterministic per-class train/val/test split of a ``<image_dir>/<class>/<image>`` tree (:func:`split_per_class`).

    Classes are the sorted folder names (label = index); images are the files directly in each class folder.

    Args:
        image_dir: Folder with one sub-folder per class.
        p_train: Fraction of each class for training.
        p_val: Fraction of each class for validation; the rest is test.
        seed: Seed of the local RNG.
        new_classnames: Optional folder name -> readable name mapping; other names get underscores replaced.

    Raises:
        ValueError: If the fractions are invalid, there are no class folders, or a class is too small to give every
            split at least one image.
    """
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"no class folders in {image_dir}")
    names = new_classnames or {}
    classes = [
        (names.get(folder, readable_classname(folder)), f"class folder {image_dir / folder}",
         [f"{folder}/{name}" for name in list_images(image_dir / folder)])
        for folder in folders
    ]
    return split_per_class(classes, p_train=p_train, p_val=p_val, seed=seed)


def make_splits(
    spec: DatasetSpec,
    image_dir: Path,
    train: Sequence[Item],
    val: Sequence[Item],
    test: Sequence[Item],
    classnames: Sequence[str] | None = None,
    split_source: str | None = None,
) -> DatasetSplits:
    """Assemble a :class:`DatasetSplits` for ``spec``, deriving class names from the items unless given;
    ``split_source`` says where the split came from (a split file's path, or how it was made)."""
    names = tuple(classnames) if classnames is not None else classnames_from_items(train, val, test)
    return DatasetSplits(
        name=spec.name,
        image_dir=image_dir,
        classnames=names,
        template=spec.template,
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        split_source=split_source,
    )


# CoCoOp's base-to-new protocol: train on the first half of the classes, evaluate on both halves.
CLASS_SUBSETS = ("all", "base", "new")


def _subset_labels(n_cls: int, which: str) -> range:
    if which not in CLASS_SUBSETS:
        raise ValueError(f"unknown class subset {which!r}; expected one of {', '.join(CLASS_SUBSETS)}")
    n_base = math.ceil(n_cls / 2)
    if which == "new" and n_base == n_cls:
        raise ValueError(f"a dataset of {n_cls} class has no new classes: the base-to-new protocol needs 2 or more "
                         "classes; use --classes all")
    return {"all": range(n_cls), "base": range(n_base), "new": range(n_base, n_cls)}[which]


def class_subset_names(classnames: Sequence[str], which: str) -> tuple[str, ...]:
    """The class names of subset ``which`` (``"all"``, ``"base"``: the first ceil(n/2) labels, ``"new"``: the rest).

    Raises:
        ValueError: For an unknown subset, or ``"new"`` of a one-class dataset.
    """
    return tuple(classnames[label] for label in _subset_labels(len(classnames), which))


def select_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """The dataset restricted to the classes of subset ``which``, relabelled ``0..m-1`` in label order.

    This is CoCoOp's ``subsample_classes``: base classes are the first ``ceil(n/2)`` labels, new classes the rest, so
    a context learned on base is evaluated on classes it never saw. Every split keeps only the chosen classes' items;
    ``"all"`` returns ``splits`` itself.

    Raises:
        ValueError: For an unknown subset, or ``"new"`` of a one-class dataset.
    """
    labels = _subset_labels(len(splits.classnames), which)
    if which == "all":
        return splits
    relabel = {old: new for new, old in enumerate(labels)}
    names = tuple(splits.classnames[old] for old in labels)

    def keep(items: Sequence[Item]) -> tuple[Item, ...]:
        return tuple(Item(it.path, relabel[it.label], it.classname) for it in items if it.label in relabel)

    return replace(
        splits, classnames=names, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test)
    )


# What PIL raises for a file that is not a decodable image: unknown format (UnidentifiedImageError is an OSError),
# truncated data ("image file is truncated"), broken headers (SyntaxError, ValueError), decompression bombs.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated or not an image)."""


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path``, fully decoded and converted to RGB (greyscale, palette, RGBA, CMYK, 16-bit all convert).

    Raises:
        UnreadableImageError: the file is corrupt, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not later
    except UNREADABLE_IMAGE_ERRORS as err:
        raise UnreadableImageError(f"cannot decode image {path}: {err}") from None


def image_header_readable(path: Path) -> bool:
    """Whether ``path`` opens as an image: its header names a format PIL reads (an empty file, a text file or a
    truncated header does not). Reads the first bytes only, never the pixels (so a file cut short after its header
    still passes; the feature extraction skips it and counts it)."""
    try:
        with Image.open(path):
            return True
    except UNREADABLE_IMAGE_ERRORS:
        return False


def check_every_class_readable(splits: DatasetSplits, items: Sequence[Item]) -> None:
    """Refuse a run in which a class has no training image that opens (every one empty, or not an image at all).

    Cheap enough for the driver before any worker starts: each class's images are tried in order until one opens, so
    sound data costs one header read per class. Only the headers are read; an image that is corrupt beyond its
    header is left to the feature extraction, which skips it and counts it.

    Raises:
        ValueError: naming the class, how many of its images were tried, the first one, and the fix.
    """
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    for label in sorted(by_class):
        tried = by_class[label]
        if not any(image_header_readable(splits.image_dir / item.path) for item in tried):
            raise ValueError(
                f"class {splits.classnames[label]!r} of {splits.name}: none of its {len(tried)} training images the "
                f"run uses opens as an image (first: {str(splits.image_dir / tried[0].path)!r}; empty files or not "
                "images): CoOp could never learn it; replace its images, or remove the class"
            )


def unreadable_images(image_dir: Path, items: Sequence[Item]) -> list[Item]:
    """The items whose image cannot be decoded (each image is decoded once)."""
    bad = []
    for item in items:
        try:
            read_rgb(Path(image_dir) / item.path)
        except UnreadableImageError:
            bad.append(item)
    return bad


class ImageListDataset(torch.utils.data.Dataset):
    """Images of a list of :class:`Item`, read from ``image_dir`` and converted to RGB.

    ``dataset[i]`` is ``(transform(RGB PIL image), label, i)``; the index lets feature caches map outputs back to
    items. Without a transform the PIL image itself is returned. An image that cannot be decoded raises
    :class:`UnreadableImageError`, or, with ``skip_unreadable``, gives ``(None, label, i)`` (feature extraction
    leaves it out and counts it).
    """

    def __init__(
        self,
        image_dir: str | Path,
        items: Sequence[Item],
        transform: Callable[[Image.Image], Any] | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.items = tuple(items)
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        item = self.items[index]
        try:
            rgb = read_rgb(self.image_dir / item.path)
        except UnreadableImageError:
            if not self.skip_unreadable:
                raise
            return None, item.label, index
        return (self.transform(rgb) if self.transform is not None else rgb), item.label, index
