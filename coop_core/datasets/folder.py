"""Any image folder or manifest as a dataset: CoOp on your own classes, with no registration and no code.

A :class:`FolderSource` says where the images are and how to read them; :func:`load_folder_dataset` turns it into the
same :class:`~coop_core.datasets.base.DatasetSplits` the registered datasets give. Three forms are read:

- a class-per-folder tree ``<path>/<class>/<image>``: classes are the sorted folder names (label = index). Images are
  found at any depth inside a class folder (``cat/2023/a.jpg`` is a ``cat``), since photo collections are often
  sorted by date or source below the class; hidden files and folders are skipped at every level, symlinked files and
  class folders are followed, symlinked folders inside a class folder are not (no cycles);
- the same tree with a CoOp split JSON (``split_file``), whose paths are relative to the tree;
- a ``.csv`` / ``.parquet`` manifest with a ``path`` (or ``image`` / ``filepath``) column relative to the manifest's
  folder, ``class`` (a name) and/or ``label`` (an int) and an optional ``split`` column (train/val/test).

Without a split (a tree, or a manifest without a ``split`` column) a deterministic stratified 50/20/30 per-class split
is made (CoOp's ``read_and_split_data``, :func:`~coop_core.datasets.base.split_per_class`) and written once, as a CoOp
split JSON, to ``<cache_dir>/splits/<name>-<digest>.json``: later loads read that file, so the split stays fixed even
if the splitting code changes, and ``DatasetSplits.split_source`` names it for the run's records.

Loading lists folders and ``stat``s files but never decodes an image: 27,000 images load in well under a second, and
a corrupt image is skipped and counted later, during feature extraction (``pipeline.prepare_features``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet

from coop_core.atomic import atomic_write_text
from coop_core.datasets.base import (
    IMAGE_SUFFIXES,
    SPLIT_NAMES,
    DatasetSplits,
    Item,
    classnames_from_items,
    list_datasets,
    read_coop_split,
    readable_classname,
    split_per_class,
)

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "image", "filepath")  # the first one present is the image path
DEFAULT_TEMPLATE = "a photo of a {}."
P_TRAIN, P_VAL = 0.5, 0.2  # CoOp's read_and_split_data fractions; the rest is test
SPLIT_CACHE_VERSION = "1"
_NAME_RE = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class FolderSource:
    """Where a folder dataset's images are and how to read them; JSON-able with ``dataclasses.asdict``.

    path: absolute path of a class-per-folder tree or of a ``.csv`` / ``.parquet`` manifest.
    name: the dataset's name, lowercase ``[a-z0-9_]+`` (the platform registers its models as ``coop-<name>``).
    template: zero-shot prompt with exactly one ``{}`` for the class name.
    classnames_file: absolute path of a names file (a JSON object or ``<class> <readable name>`` lines), or None.
    split_file: absolute path of a CoOp split JSON for a tree (paths relative to ``path``), or None.
    split_seed: seed of the split made when there is none.
    """

    path: str
    name: str
    template: str = DEFAULT_TEMPLATE
    classnames_file: str | None = None
    split_file: str | None = None
    split_seed: int = 1

    def __post_init__(self) -> None:
        for attr in ("path", "classnames_file", "split_file"):
            value = getattr(self, attr)
            if (value is not None or attr == "path") and (not isinstance(value, str) or not Path(value).is_absolute()):
                raise ValueError(f"FolderSource.{attr} must be an absolute path, got {value!r}; build the source with "
                                 "folder_source(), which resolves relative paths")
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"dataset name must be lowercase letters, digits and '_', got {self.name!r}; pass "
                             "another name (--dataset-name)")
        if self.name in list_datasets():
            raise ValueError(f"{self.name!r} is the built-in dataset's name; pass another name (--dataset-name)")
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {self.template!r}; "
                             f"e.g. {DEFAULT_TEMPLATE!r}")
        if not isinstance(self.split_seed, numbers.Integral) or isinstance(self.split_seed, bool):
            raise ValueError(f"split_seed must be an integer, got {self.split_seed!r}")
        if self.is_manifest and self.split_file is not None:
            raise ValueError(f"{self.path} is a manifest: its split is its 'split' column, not a split file; drop "
                             "split_file, or point path at the image folder the split file's paths are relative to")

    @property
    def is_manifest(self) -> bool:
        """Whether :attr:`path` is a manifest file rather than a folder tree."""
        return Path(self.path).suffix.lower() in MANIFEST_SUFFIXES


def default_name(path: str | Path) -> str:
    """A dataset name from a folder's (or manifest's stem's) name: lowercased, other characters' runs become ``_``
    (``"My Photos-2024"`` -> ``"my_photos_2024"``)."""
    path = Path(path)
    stem = path.stem if path.suffix.lower() in MANIFEST_SUFFIXES else path.name
    return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_")


def _existing_file(path: str | Path, what: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(f"{what} {resolved} does not exist (or is not a file); pass the path of an existing file")
    return str(resolved)


def folder_source(
    path: str | Path,
    *,
    name: str | None = None,
    template: str | None = None,
    classnames_file: str | Path | None = None,
    split_file: str | Path | None = None,
    split_seed: int = 1,
) -> FolderSource:
    """A validated :class:`FolderSource` for ``path``, with paths made absolute and a default name.

    Args:
        path: A class-per-folder tree, or a ``.csv`` / ``.parquet`` manifest.
        name: The dataset's name; default :func:`default_name` of ``path``.
        template: Zero-shot prompt with one ``{}``; default ``"a photo of a {}."``.
        classnames_file: Optional names file (see :func:`read_names_file`).
        split_file: Optional CoOp split JSON for a tree.
        split_seed: Seed of the split made when there is none.

    Raises:
        ValueError: A path that does not exist, a file that is not a manifest, or an invalid name or template.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ValueError(f"{resolved} does not exist; pass an image folder (one sub-folder per class) or a "
                         f"{'/'.join(MANIFEST_SUFFIXES)} manifest")
    if resolved.is_file() and resolved.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(f"{resolved} is neither a folder nor a manifest; pass an image folder (one sub-folder per "
                         f"class) or a {'/'.join(MANIFEST_SUFFIXES)} manifest")
    if name is None:
        name = default_name(resolved)
        if not name:
            raise ValueError(f"cannot make a dataset name from {resolved.name!r}; pass one (--dataset-name)")
    return FolderSource(
        path=str(resolved),
        name=name,
        template=DEFAULT_TEMPLATE if template is None else template,
        classnames_file=None if classnames_file is None else _existing_file(classnames_file, "classnames file"),
        split_file=None if split_file is None else _existing_file(split_file, "split file"),
        split_seed=split_seed,
    )


def read_names_file(path: str | Path) -> dict[str, str]:
    """Read a names file: a JSON object ``{class: readable name}`` (like CoOp's Flowers ``cat_to_name.json``), or
    text lines ``<class> <readable name>`` (like ImageNet's ``classnames.txt``). Keys are class folders, manifest
    class values, or (for a label-only manifest) labels.

    Raises:
        ValueError: A file of neither form, a key twice, or an empty name.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    fix = "write a JSON object {\"<class>\": \"<readable name>\"} or one '<class> <readable name>' line per class"
    names: dict[str, str] = {}
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"names file {path} is not valid JSON ({err}); {fix}") from None
        if not isinstance(data, Mapping) or not all(isinstance(v, str) and v.strip() for v in data.values()):
            raise ValueError(f"names file {path} must map each class to a non-empty name; {fix}")
        return {str(k): v.strip() for k, v in data.items()}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, _, name = line.strip().partition(" ")
        if not name.strip():
            raise ValueError(f"names file {path}, line {number}: {line.strip()!r} has no readable name; {fix}")
        if key in names:
            raise ValueError(f"names file {path}, line {number}: class {key!r} is named twice; keep one line")
        names[key] = name.strip()
    return names


def _apply_names(keys: Sequence[str], names: Mapping[str, str] | None, names_path: str | None,
                 where: str) -> tuple[str, ...]:
    """Readable class names for ``keys`` (folders or manifest classes), from ``names`` where it has an entry."""
    names = names or {}
    unknown = [k for k in names if k not in set(keys)]
    if unknown:
        raise ValueError(f"{len(unknown)} entries of names file {names_path} match no class of {where} (first: "
                         f"{unknown[0]!r}); a key must be a class folder (or manifest class): fix or remove it")
    readable = tuple(readable_classname(names.get(k, k)) for k in keys)
    seen: dict[str, str] = {}
    for key, name in zip(keys, readable):
        other = seen.setdefault(name.casefold(), key)
        if other != key:
            raise ValueError(f"classes {other!r} and {key!r} of {where} both read as {name!r} (names are compared "
                             "ignoring case and '_'): CLIP cannot tell them apart; rename or merge one of the folders, "
                             "or give them distinct names in a classnames file")
    return readable


def _list_class_images(tree: Path, class_dir: Path) -> list[str]:
    """Image paths (relative to ``tree``) at any depth in ``class_dir``, hidden files and folders skipped."""
    images = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(tree).as_posix()
        images += [f"{rel}/{f}" for f in filenames
                   if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return images


def _tree_classes(tree: Path) -> list[tuple[str, list[str]]]:
    """``(folder, image paths)`` per class folder of ``tree``, sorted by folder name."""
    folders = sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"no class folders in {tree}: a folder dataset is <folder>/<class>/<image>; put each class's "
                         "images in a sub-folder named after it")
    classes = []
    for folder in folders:
        images = _list_class_images(tree, folder)
        if not images:
            raise ValueError(f"class folder {folder} has no images (no {'/'.join(sorted(IMAGE_SUFFIXES))} files): add "
                             "its images or remove the folder")
        classes.append((folder.name, images))
    return classes


def _check_exist(image_dir: Path, paths: Sequence[str], what: str) -> None:
    missing = [p for p in paths if not (image_dir / p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} images {what} names are not under {image_dir} (first: "
                         f"{missing[0]!r}): fix the paths, or add the images")


# --- manifests ----------------------------------------------------------------------------------------------------


def _read_table(path: Path) -> pa.Table:
    if path.suffix.lower() == ".parquet":
        return pyarrow.parquet.read_table(path)
    text_columns = {c: pa.string() for c in (*PATH_COLUMNS, "class", "split")}  # "007" stays a name, not 7
    return pyarrow.csv.read_csv(path, convert_options=pyarrow.csv.ConvertOptions(column_types=text_columns))


def _manifest_path(raw: object, row: int, manifest: Path) -> str:
    folder = manifest.parent
    fix = f"list each image relative to {folder} (no leading '/', no '..'), and keep the images under that folder"
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{manifest}: row {row} has no image path; {fix}")
    posix = PurePosixPath(raw.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(raw).drive or ".." in posix.parts or posix.as_posix() == ".":
        raise ValueError(f"{manifest}: row {row} names {raw!r}, outside the manifest's folder; {fix}")
    return posix.as_posix()


def _manifest_label(raw: object, row: int, manifest: Path) -> int:
    try:
        label = int(raw) if isinstance(raw, (numbers.Integral, str)) and not isinstance(raw, bool) else None
    except ValueError:
        label = None
    if label is None or label < 0:
        raise ValueError(f"{manifest}: row {row} has label {raw!r}; labels are integers 0, 1, ...: fix the row")
    return label


def _manifest_rows(manifest: Path) -> tuple[list[str], list[str | None], list[int | None], list[str] | None]:
    """Paths, class values, labels and split values of a manifest's rows (None where the column is absent)."""
    table = _read_table(manifest)
    columns = set(table.column_names)
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None or not columns & {"class", "label"}:
        raise ValueError(f"manifest {manifest} has columns {sorted(columns)}; it needs an image column "
                         f"({' / '.join(PATH_COLUMNS)}) and a 'class' (name) and/or 'label' (int) column")
    if table.num_rows == 0:
        raise ValueError(f"manifest {manifest} has no rows; list one image per row")
    data = {c: table.column(c).to_pylist() for c in columns & {path_column, "class", "label", "split"}}
    paths = [_manifest_path(raw, row, manifest) for row, raw in enumerate(data[path_column], start=1)]
    seen: dict[str, int] = {}
    for row, path in enumerate(paths, start=1):
        if seen.setdefault(path, row) != row:
            raise ValueError(f"{manifest}: rows {seen[path]} and {row} both list {path!r}; list each image once")
    classes: list[str | None] = [None] * len(paths)
    if "class" in data:
        for row, value in enumerate(data["class"], start=1):
            if value is None or not str(value).strip():
                raise ValueError(f"{manifest}: row {row} has no class; fill in the 'class' column")
        classes = [str(v).strip() for v in data["class"]]
    labels: list[int | None] = [None] * len(paths)
    if "label" in data:
        labels = [_manifest_label(raw, row, manifest) for row, raw in enumerate(data["label"], start=1)]
    splits = None
    if "split" in data:
        splits = [str(v).strip().lower() if v is not None else "" for v in data["split"]]
        for row, value in enumerate(splits, start=1):
            if value not in SPLIT_NAMES:
                raise ValueError(f"{manifest}: row {row} has split {data['split'][row - 1]!r}; the 'split' column "
                                 f"holds {', '.join(SPLIT_NAMES)} (or drop the column to have a split made)")
    return paths, classes, labels, splits


def _manifest_classes(manifest: Path, classes: list[str | None], labels: list[int | None],
                      names: Mapping[str, str] | None, names_path: str | None) -> tuple[list[int], tuple[str, ...]]:
    """The label of every row and the readable class names of a manifest."""
    where = f"manifest {manifest}"
    if labels[0] is None:  # class names only: sorted, label = index
        keys = sorted(set(classes))
        label_of = {k: i for i, k in enumerate(keys)}
        return [label_of[c] for c in classes], _apply_names(keys, names, names_path, where)
    n_cls = max(labels) + 1
    if classes[0] is None:  # labels only: the names file names them
        if names is None:
            raise ValueError(f"{where} has labels but no 'class' column: pass a classnames file mapping each label "
                             "(0, 1, ...) to its name (--classnames-file), or add a 'class' column")
        by_label: dict[int, str] = {}
        for key, name in names.items():
            if not key.strip().isdigit():
                raise ValueError(f"names file {names_path} has key {key!r}, but {where} has labels only: its keys "
                                 "must be the labels 0, 1, ...")
            by_label[int(key)] = name
        n_cls = max(n_cls, max(by_label, default=-1) + 1)
        unnamed = [label for label in range(n_cls) if label not in by_label]
        if unnamed:
            raise ValueError(f"label {unnamed[0]} of {where} has no name in {names_path} ({len(unnamed)} unnamed); "
                             f"add a '<label> <name>' entry for every label 0..{n_cls - 1}")
        keys = [str(label) for label in range(n_cls)]
        return list(labels), _apply_names(keys, {str(k): v for k, v in by_label.items()}, names_path, where)
    class_of: dict[int, str] = {}
    label_of_class: dict[str, int] = {}
    for row, (cls, label) in enumerate(zip(classes, labels), start=1):
        known_class, known_label = class_of.setdefault(label, cls), label_of_class.setdefault(cls, label)
        if known_class != cls:
            raise ValueError(f"{manifest}: row {row} gives label {label} class {cls!r}, but other rows give it "
                             f"{known_class!r}; one class name per label: fix the rows")
        if known_label != label:
            raise ValueError(f"{manifest}: row {row} gives class {cls!r} label {label}, but other rows give it "
                             f"{known_label}; one label per class name: fix the rows")
    missing = [label for label in range(n_cls) if label not in class_of]
    if missing:
        raise ValueError(f"labels of {where} must be 0..{n_cls - 1}, but {missing[:5]} have no rows; renumber them")
    keys = [class_of[label] for label in range(n_cls)]
    return list(labels), _apply_names(keys, names, names_path, where)


# --- the split made once ------------------------------------------------------------------------------------------


def _split_digest(classes: Sequence[tuple[str, str, Sequence[str]]], seed: int) -> str:
    h = hashlib.sha256(f"coop-folder-split-v{SPLIT_CACHE_VERSION}\n".encode())
    h.update(json.dumps({"seed": seed, "p_train": P_TRAIN, "p_val": P_VAL,
                         "classnames": [name for name, _, _ in classes]}).encode())
    for label, (_, _, paths) in enumerate(classes):
        for path in sorted(paths):
            h.update(f"{label}\t{path}\n".encode())
    return h.hexdigest()


def _made_split(source: FolderSource, classes: Sequence[tuple[str, str, Sequence[str]]], image_dir: Path,
                cache_dir: str | Path | None) -> tuple[list[Item], list[Item], list[Item], str]:
    """The per-class split of ``classes``, read from its file in ``cache_dir`` if it is there, else made (and
    written there once); also the split's source for :attr:`DatasetSplits.split_source`."""
    train, val, test = split_per_class(classes, p_train=P_TRAIN, p_val=P_VAL, seed=source.split_seed)
    counts = f"{len(train)}/{len(val)}/{len(test)} train/val/test images of {len(classes)} classes"
    if cache_dir is None:
        logger.info("%s: made a per-class split (seed %d), %s; not written (no cache_dir)", source.name,
                    source.split_seed, counts)
        return train, val, test, f"per-class split made in memory (seed {source.split_seed})"
    cache = Path(cache_dir).expanduser().resolve()
    if cache == image_dir or image_dir in cache.parents:
        raise ValueError(f"cache_dir {cache} is inside the image folder {image_dir}; caches never go in the data: "
                         "pass a cache_dir outside it")
    path = cache / "splits" / f"{source.name}-{_split_digest(classes, source.split_seed)[:16]}.json"
    expected = sorted((it.path, it.label, it.classname) for it in (*train, *val, *test))
    if path.is_file():
        try:
            stored = read_coop_split(path)
            if sorted((it.path, it.label, it.classname) for items in stored for it in items) == expected:
                logger.info("%s: split read from %s (%s)", source.name, path, counts)
                return *stored, str(path)
            logger.warning("%s does not hold these images; writing it again", path)
        except ValueError as err:
            logger.warning("%s is not a valid split file (%s); writing it again", path, err)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {split: [[it.path, it.label, it.classname] for it in items]
            for split, items in zip(SPLIT_NAMES, (train, val, test))}
    atomic_write_text(path, json.dumps(data, indent=0) + "\n")
    logger.info("%s: made a per-class split (seed %d), %s; written to %s", source.name, source.split_seed, counts, path)
    return train, val, test, str(path)


# --- loading ------------------------------------------------------------------------------------------------------


def load_folder_dataset(source: FolderSource, cache_dir: str | Path | None) -> DatasetSplits:
    """Load the folder tree or manifest ``source`` names (see the module docstring for the forms and rules).

    Args:
        source: What to load.
        cache_dir: Folder for the split file made when the data has no split; None makes it in memory only.

    Returns:
        The splits, named ``source.name`` with ``source.template``; ``image_dir`` is the tree, or the manifest's
        folder; ``split_source`` says where the split came from.

    Raises:
        ValueError: One line naming the problem and the fix: no class folders, an empty or too-small class, two
            classes with the same name, a manifest row outside its folder or with a bad column, or images the
            manifest or split file names that are not there.
    """
    names_path = source.classnames_file
    names = read_names_file(names_path) if names_path else None
    path = Path(source.path)
    if source.is_manifest:
        if not path.is_file():
            raise ValueError(f"manifest {path} does not exist; pass an existing .csv/.parquet file")
        image_dir = path.parent
        paths, classes, labels, split_of = _manifest_rows(path)
        row_labels, classnames = _manifest_classes(path, classes, labels, names, names_path)
        _check_exist(image_dir, paths, f"manifest {path}")
        if split_of is not None:
            items = {s: [Item(p, lab, classnames[lab]) for p, lab, sp in zip(paths, row_labels, split_of) if sp == s]
                     for s in SPLIT_NAMES}
            train, val, test, split_source = items["train"], items["val"], items["test"], f"{path} ('split' column)"
        else:
            per_class: list[list[str]] = [[] for _ in classnames]
            for p, lab in zip(paths, row_labels):
                per_class[lab].append(p)
            keyed = [(name, f"class {name!r} of manifest {path}", ps) for name, ps in zip(classnames, per_class)]
            train, val, test, split_source = _made_split(source, keyed, image_dir, cache_dir)
    else:
        if not path.is_dir():
            raise ValueError(f"image folder {path} does not exist; pass a folder with one sub-folder per class")
        image_dir = path
        if source.split_file is not None:
            train, val, test = read_coop_split(Path(source.split_file))
            split_names = classnames_from_items(train, val, test)
            by_name = {readable_classname(k): v for k, v in names.items()} if names else None
            classnames = _apply_names(split_names, by_name, names_path, f"split file {source.split_file}")
            train, val, test = ([Item(it.path, it.label, classnames[it.label]) for it in items]
                                for items in (train, val, test))
            _check_exist(image_dir, [it.path for it in (*train, *val, *test)], f"split file {source.split_file}")
            split_source = source.split_file
        else:
            tree = _tree_classes(image_dir)
            classnames = _apply_names([folder for folder, _ in tree], names, names_path, f"folder {image_dir}")
            keyed = [(name, f"class folder {image_dir / folder}", images)
                     for name, (folder, images) in zip(classnames, tree)]
            train, val, test, split_source = _made_split(source, keyed, image_dir, cache_dir)
    return DatasetSplits(name=source.name, image_dir=image_dir, classnames=classnames, template=source.template,
                         train=train, val=val, test=test, split_source=split_source)
