"""Few-shot sampling (K images per class) and its cached, content-keyed Parquet manifests.

Sampling uses a local ``random.Random(seed)`` and sorts each class by path first, so the same split, K and seed give
the same images on every machine, whatever order the split was listed in. The manifest records exactly which images a
run used (columns ``split, path, label, classname``); it lives in an explicit cache directory, never inside the data
root, under a file name keyed by the dataset, K, seed and a hash of the source split, and is written atomically so
concurrent workers can build it at the same time.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from coop_core.atomic import CacheWriteError, atomic_path, exclusive_lock
from coop_core.config import ALL_SHOTS, check_shots
from coop_core.datasets.base import DatasetSplits, Item

logger = logging.getLogger(__name__)

VAL_SHOTS_CAP = 4  # CoOp samples min(K, 4) validation images per class.
# The registry evaluation set (registry_eval_items): a fixed sample of each dataset's validation split.
REGISTRY_EVAL_PER_CLASS = 50
REGISTRY_EVAL_SEED = 0
MANIFEST_VERSION = "1"  # bump when the sampling algorithm or the manifest format changes
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("classname", pa.string(), nullable=False),
    ]
)
_MANIFEST_SPLITS = ("train", "val")


def _check_shots(shots: int | str) -> None:
    check_shots(shots)


def val_shots(shots: int | str) -> int:
    """Validation images per class for ``shots``: CoOp's min(K, 4) (4 for ``"all"``)."""
    return VAL_SHOTS_CAP if shots == ALL_SHOTS else min(shots, VAL_SHOTS_CAP)


def check_shots_fit(splits: DatasetSplits, shots: int | str) -> None:
    """Refuse a ``shots`` larger than the smallest class of the train split (almost always a typo).

    Raises:
        ValueError: naming the smallest class, its size, and the two ways out (a smaller K, or ``"all"``).
    """
    _check_shots(shots)
    if shots == ALL_SHOTS:
        return
    counts = _class_counts(splits.train)
    label = min(range(len(splits.classnames)), key=lambda c: (counts.get(c, 0), c))
    if counts.get(label, 0) < shots:
        raise ValueError(
            f"shots {shots} is more than the smallest class has: {splits.classnames[label]!r} has "
            f"{counts.get(label, 0)} training images in {splits.name}; use shots <= {counts.get(label, 0)}, "
            f"or shots 'all' (--shots all) to train on every training image"
        )


def sample_few_shot(items: Sequence[Item], shots: int | str, seed: int) -> list[Item]:
    """Sample ``shots`` items per class.

    Classes are visited in label order with one ``random.Random(seed)``; each class is sorted by path before
    ``rng.sample``, so the result does not depend on the input order. A class with fewer than ``shots`` items
    contributes all of them (with a warning); ``shots="all"`` takes every item of every class (path order).

    Args:
        items: The pool, e.g. a dataset's train split.
        shots: Items per class (K), >= 1, or ``"all"``.
        seed: Seed of the local RNG; the global ``random`` state is neither used nor changed.

    Returns:
        The sampled items, grouped by label in ascending order.
    """
    _check_shots(shots)
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    sampled: list[Item] = []
    for label in sorted(by_label):
        pool = sorted(by_label[label], key=lambda it: (it.path, it.classname))
        if shots == ALL_SHOTS:
            sampled += pool
        elif len(pool) < shots:
            logger.warning(
                "class %d (%s) has only %d items, fewer than %d shots: taking all of them",
                label,
                pool[0].classname,
                len(pool),
                shots,
            )
            sampled += pool
        else:
            sampled += rng.sample(pool, shots)
    return sampled


def registry_eval_items(val: Sequence[Item]) -> list[Item]:
    """The dataset's registry evaluation set: up to :data:`REGISTRY_EVAL_PER_CLASS` images of each class of the
    validation split ``val``, drawn with the fixed :data:`REGISTRY_EVAL_SEED`.

    Every run of a dataset measures its prompts on these same images, whatever its shots and seed (its own few-shot
    validation images, ``min(K, 4)`` per class drawn with the run's seed, differ from run to run): the registry's
    champion rule compares runs by their accuracy here. The validation split never overlaps the training split, so
    no run has trained on these images. A class with fewer images contributes all of them.
    """
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in val:
        by_label[item.label].append(item)
    rng = random.Random(REGISTRY_EVAL_SEED)
    chosen: list[Item] = []
    for label in sorted(by_label):
        pool = sorted(by_label[label], key=lambda it: (it.path, it.classname))
        chosen += pool if len(pool) <= REGISTRY_EVAL_PER_CLASS else rng.sample(pool, REGISTRY_EVAL_PER_CLASS)
    return chosen


@dataclass(frozen=True)
class FewShotSplits:
    """The few-shot train and val items of one (dataset, K, seed), and the manifest recording them.

    manifest_path: the Parquet manifest in the cache directory, or None when no cache directory was given.
    """

    train: tuple[Item, ...]
    val: tuple[Item, ...]
    manifest_path: Path | None

    def __post_init__(self) -> None:
        for field in ("train", "val"):
            items = tuple(getattr(self, field))
            if not all(isinstance(item, Item) for item in items):
                raise ValueError(f"FewShotSplits.{field} must hold Item objects")
            object.__setattr__(self, field, items)
        if self.manifest_path is not None:
            object.__setattr__(self, "manifest_path", Path(self.manifest_path))
        if not self.train:
            raise ValueError("FewShotSplits.train is empty")


def source_hash(splits: DatasetSplits) -> str:
    """sha256 of the train and val splits' (path, label, classname), independent of their order."""
    digest = hashlib.sha256(f"coop-fewshot-v{MANIFEST_VERSION}\n".encode())
    for split in _MANIFEST_SPLITS:
        lines = sorted(f"{split}\t{it.path}\t{it.label}\t{it.classname}\n" for it in splits.split(split))
        for line in lines:
            digest.update(line.encode("utf-8"))
    return digest.hexdigest()


def manifest_name(dataset: str, shots: int | str, seed: int, digest: str) -> str:
    """File name of a manifest: ``fewshot_<dataset>_<K>shot_seed<seed>_<hash16>.parquet``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset) or "dataset"
    return f"fewshot_{safe}_{shots}shot_seed{seed}_{digest[:16]}.parquet"


def _check_outside_data(cache_dir: Path, image_dir: Path) -> None:
    images = image_dir.resolve()
    cache = cache_dir.resolve()
    if cache == images or images in cache.parents:
        raise ValueError(f"cache_dir {cache_dir} is inside the image folder {image_dir}; caches never go in the data")


def _class_counts(items: Sequence[Item]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for item in items:
        counts[item.label] += 1
    return dict(counts)


def _metadata(splits: DatasetSplits, shots: int | str, seed: int, digest: str) -> dict[bytes, bytes]:
    meta = {"version": MANIFEST_VERSION, "dataset": splits.name, "shots": str(shots), "seed": str(seed)}
    meta["source_sha256"] = digest
    return {f"coop_fewshot.{k}".encode(): v.encode() for k, v in meta.items()}


def _write_manifest(path: Path, train: Sequence[Item], val: Sequence[Item], metadata: dict[bytes, bytes]) -> None:
    rows = [("train", it) for it in train] + [("val", it) for it in val]
    table = pa.table(
        {
            "split": [split for split, _ in rows],
            "path": [it.path for _, it in rows],
            "label": [it.label for _, it in rows],
            "classname": [it.classname for _, it in rows],
        },
        schema=MANIFEST_SCHEMA.with_metadata(metadata),
    )
    try:
        with atomic_path(path) as tmp:  # readable by every user of a shared cache; never a partial file
            pq.write_table(table, str(tmp))
    except OSError as err:
        raise CacheWriteError(f"cannot write the few-shot manifest under {path.parent} ({err.strerror or err}); free "
                              "space there or pass another --cache-dir (nothing partial was kept)") from None


def _read_manifest(
    path: Path, splits: DatasetSplits, shots: int | str, metadata: dict[bytes, bytes]
) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Items of a manifest; raises ValueError (or an Arrow/OS error) if it is unreadable or does not fit ``splits``."""
    table = pq.read_table(path)
    if not table.schema.remove_metadata().equals(MANIFEST_SCHEMA):
        raise ValueError(f"unexpected columns {table.schema.names}")
    stored = table.schema.metadata or {}
    if any(stored.get(k) != v for k, v in metadata.items()):
        raise ValueError("manifest metadata does not match the requested dataset, shots, seed or source split")
    columns = table.to_pydict()
    result: dict[str, list[Item]] = {split: [] for split in _MANIFEST_SPLITS}
    for split, rel, label, classname in zip(
        columns["split"], columns["path"], columns["label"], columns["classname"], strict=True
    ):
        if split not in result:
            raise ValueError(f"unknown split {split!r} in manifest")
        result[split].append(Item(rel, label, classname))
    for split, k in (("train", shots), ("val", val_shots(shots))):
        source = splits.split(split)
        items = result[split]
        if _class_counts(items) != {label: n if k == ALL_SHOTS else min(n, k)
                                    for label, n in _class_counts(source).items()}:
            raise ValueError(f"manifest {split} does not hold {k} items per class")
        members = set(source)
        if len(set(items)) != len(items) or any(it not in members for it in items):
            raise ValueError(f"manifest {split} items are not a sample of the dataset's {split} split")
    return tuple(result["train"]), tuple(result["val"])


def build_few_shot(splits: DatasetSplits, shots: int | str, seed: int, cache_dir: str | Path | None
                   ) -> FewShotSplits:
    """Few-shot train/val items for (dataset, K, seed), reusing a cached manifest when one exists.

    ``train`` is ``sample_few_shot(splits.train, shots, seed)`` and ``val`` is
    ``sample_few_shot(splits.val, min(shots, 4), seed)`` (CoOp's few-shot validation set). A ``shots`` larger than
    the smallest training class is refused (:func:`check_shots_fit`); ``"all"`` takes every training image. With a
    cache directory the result is stored as a Parquet manifest there (see :func:`manifest_name`); an existing manifest
    that is readable and matches the source split is reused, a damaged one is rebuilt. Concurrent builders take turns
    on a lock file beside it, so one writes and the others reuse its manifest; the write goes to a temporary file in
    the same directory and is renamed into place, so no reader sees a partial file.

    Args:
        splits: The loaded dataset.
        shots: Training images per class (K), >= 1 and at most the smallest class, or ``"all"``.
        seed: Sampling seed.
        cache_dir: Folder for manifests (created if needed), or None to write nothing. Keep it outside the data root;
            a folder inside the image folder is refused.

    Raises:
        ValueError: Invalid ``shots``, more shots than the smallest class, or ``cache_dir`` inside the image folder.
    """
    check_shots_fit(splits, shots)
    if cache_dir is None:
        train = sample_few_shot(splits.train, shots, seed)
        val = sample_few_shot(splits.val, val_shots(shots), seed)
        return FewShotSplits(train=tuple(train), val=tuple(val), manifest_path=None)

    cache_dir = Path(cache_dir)
    _check_outside_data(cache_dir, splits.image_dir)
    digest = source_hash(splits)
    metadata = _metadata(splits, shots, seed, digest)
    path = cache_dir / manifest_name(splits.name, shots, seed, digest)
    found = _reuse_manifest(path, splits, shots, metadata)
    if found is not None:
        return found
    try:
        with exclusive_lock(path.with_name(path.name + ".lock")):  # concurrent builders: one writes, the rest reuse
            found = _reuse_manifest(path, splits, shots, metadata)
            if found is not None:
                return found
            train = sample_few_shot(splits.train, shots, seed)
            val = sample_few_shot(splits.val, val_shots(shots), seed)
            _write_manifest(path, train, val, metadata)
    except CacheWriteError:
        raise
    except OSError as err:  # the lock file itself: an unwritable cache folder
        raise CacheWriteError(f"cannot write the few-shot manifest under {cache_dir} ({err.strerror or err}); pass a "
                              "writable --cache-dir") from None
    logger.info("wrote few-shot manifest %s (%d train, %d val)", path, len(train), len(val))
    return FewShotSplits(train=tuple(train), val=tuple(val), manifest_path=path)


def _reuse_manifest(path: Path, splits: DatasetSplits, shots: int | str, metadata: dict[bytes, bytes]
                    ) -> FewShotSplits | None:
    """The few-shot split of an existing, valid manifest; None when there is none (a damaged one is rebuilt)."""
    if not path.exists():
        return None
    try:
        train_items, val_items = _read_manifest(path, splits, shots, metadata)
    except Exception as err:  # any damage (truncated file, wrong schema, stale content) means rebuild
        logger.warning("few-shot manifest %s is unreadable or stale (%s); rebuilding it", path, err)
        return None
    logger.debug("reusing few-shot manifest %s", path)
    return FewShotSplits(train=train_items, val=val_items, manifest_path=path)
