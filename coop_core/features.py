"""Frozen image features: extraction, a content-keyed on-disk cache, and the feature sources training reads.

CLIP's image encoder is frozen in CoOp, so an image's feature depends only on (weights, image, transform, random
augmentation draw). We compute test/val features once (centre crop) and, for training, ``K`` augmented views per
image; each epoch draws one view per image. ``ExactImages`` instead runs the encoder on freshly augmented images
every step, as the reference implementation does.

Cache entries are safetensors files named by a sha256 of their key, written atomically (temp file + rename) under an
exclusive file lock, so concurrent trials and DDP workers compute each entry once; a damaged entry (unreadable, or
its stored digest does not match) is detected and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from coop_core.atomic import CacheWriteError, atomic_path, exclusive_lock

logger = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Normalised image features with labels.

    features: ``(n, d)`` for evaluation, or ``(n_views, n, d)`` for cached training views.
    labels: ``(n,)`` int64.
    """

    features: torch.Tensor
    labels: torch.Tensor

    def to(self, device: str | torch.device) -> FeatureSet:
        return FeatureSet(self.features.to(device), self.labels.to(device))


class TrainSource(Protocol):
    """What the training loop reads: labels, and normalised image features for a set of indices in an epoch."""

    labels: torch.Tensor

    def batch(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Normalised features ``(len(indices), d)`` for these training items in this epoch."""
        ...


class CachedViews:
    """Training features from ``K`` pre-computed augmented views; epoch ``e`` uses one view per image.

    The view drawn for (image, epoch) comes from a generator seeded by ``(seed, epoch)``, so every DDP worker and a
    resumed run agree on it without communication.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> None:
        if views.dim() != 3:
            raise ValueError(f"views must be (n_views, n, d), got shape {tuple(views.shape)}")
        if views.shape[1] != labels.shape[0]:
            raise ValueError(f"{views.shape[1]} feature rows but {labels.shape[0]} labels")
        self.views = views  # (n_views, n, d)
        self.labels = labels
        self.seed = seed
        self._epoch = -1
        self._choice = torch.empty(0, dtype=torch.long)

    def batch(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._choice = torch.randint(self.views.shape[0], (self.views.shape[1],), generator=g)
            self._epoch = epoch
        idx = indices.cpu()
        return self.views[self._choice[idx].to(self.views.device), idx.to(self.views.device)]  # (b, d)


class ExactImages:
    """Training features computed on the fly: load, augment and encode each batch (the reference compute)."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
                 device: str | torch.device = "cpu") -> None:
        self.dataset = dataset
        self.labels = labels
        self.encode = encode
        self.device = torch.device(device)

    def batch(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        images = torch.stack([self.dataset[int(i)][0] for i in indices.tolist()]).to(self.device)
        return self.encode(images)


def collate_readable(batch: list[tuple]) -> list | None:
    """``default_collate`` of the samples whose image decoded (an unreadable one comes as ``(None, label, index)``)."""
    readable = [sample for sample in batch if sample[0] is not None]
    return default_collate(readable) if readable else None


def _encoded_batches(image_encoder: nn.Module, loader: DataLoader, device: str | torch.device, precision: str,
                     on_batch: Callable[[int], None] | None) -> Iterator[tuple[torch.Tensor, Sequence]]:
    """L2-normalised fp32 features of each batch of ``loader`` (on the CPU) with the batch itself; a batch that is
    None (no readable image in it) is skipped. ``on_batch(n)`` is called after each batch with its image count."""
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    image_encoder.eval()
    for batch in loader:
        if batch is None:
            continue
        with autocast:
            out = image_encoder(batch[0].to(device, non_blocking=True))
        yield F.normalize(out.float(), dim=-1).cpu(), batch
        if on_batch is not None:
            on_batch(len(out))


@torch.no_grad()
def extract_readable(
    image_encoder: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the frozen image encoder over ``dataset``, leaving out samples whose image is ``None`` (unreadable).

    The dataset yields ``(image, label, index)`` (``ImageListDataset(..., skip_unreadable=True)``).
    ``on_batch(n)`` is called after each batch with its number of readable images (for a progress display).

    Returns:
        L2-normalised fp32 features ``(n_kept, d)``, their labels ``(n_kept,)`` and dataset indices ``(n_kept,)``.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_readable)
    feats, labels, kept = [], [], []
    for out, (_, y, index) in _encoded_batches(image_encoder, loader, device, precision, on_batch):
        feats.append(out)
        labels.append(torch.as_tensor(y))
        kept.append(torch.as_tensor(index))
    if not feats:
        raise ValueError(f"cannot extract features: none of the {len(dataset)} images could be read")
    return torch.cat(feats), torch.cat(labels).long(), torch.cat(kept).long()


@torch.no_grad()
def extract_features(
    image_encoder: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen image encoder over ``dataset``; returns L2-normalised fp32 features ``(n, d)`` and labels.

    ``on_batch(n)`` is called after each batch with its number of images (for a progress display).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for out, batch in _encoded_batches(image_encoder, loader, device, precision, on_batch):
        feats.append(out)
        labels.append(torch.as_tensor(batch[1]))
    if not feats:
        raise ValueError("cannot extract features from an empty dataset")
    return torch.cat(feats), torch.cat(labels).long()


def cache_key(parts: dict) -> str:
    """Content key of a cache entry: sha256 of the canonical JSON of ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def items_digest(items: Sequence) -> str:
    """Digest of an ordered item list (relative path + label), so a changed split changes the key."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()


def weights_identity(pretrained: str) -> str:
    """Identify weights for cache keys: a tag as is; a checkpoint file by absolute path, size and mtime."""
    if os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"file:{os.path.abspath(pretrained)}:{st.st_size}:{st.st_mtime_ns}"
    return f"tag:{pretrained}"


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Content-keyed tensor cache in an explicit directory (never inside the data root)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / "features" / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # truncated or corrupt file
            logger.warning("feature cache entry %s is damaged (%s); rebuilding", path.name, err)
            return None
        if meta.get("sha256") != _tensor_digest(tensors):
            logger.warning("feature cache entry %s fails its checksum; rebuilding", path.name)
            return None
        return tensors

    def get_or_compute(self, parts: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Return the cached tensors for ``parts``, computing and storing them once if absent or damaged."""
        key = cache_key(parts)
        path = self.path(key)
        found = self._read(path)
        if found is not None:
            return found
        try:
            with exclusive_lock(path.with_suffix(".lock")):
                found = self._read(path)  # another process may have finished it while we waited
                if found is not None:
                    return found
                tensors = {k: v.contiguous().cpu() for k, v in compute().items()}
                meta = {"sha256": _tensor_digest(tensors), "key": json.dumps(parts, sort_keys=True, default=str)}
                with atomic_path(path) as tmp:  # a full disk mid-write leaves no partial entry behind
                    save_file(tensors, str(tmp), metadata=meta)
        except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error
            reason = getattr(err, "strerror", None) or str(err).strip()[:200]
            raise CacheWriteError(f"cannot write the feature cache under {self.root} ({reason}); free space there or "
                                  "pass another --cache-dir (nothing partial was kept)") from None
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in tensors.items())
        logger.info("cached features %s (%s)", path.name, shapes)
        return tensors
