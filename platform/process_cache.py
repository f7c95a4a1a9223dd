"""Warm trial processes: what a trial loads (CLIP, the splits, the few-shot split, image features) is kept per process.

A sweep's trials differ in their prompt and recipe, not in their backbone or data, so a process that runs several
trials (Ray Tune reuses a trial's actor for the next trial, see ``platform/sweep/tuner.py``) loads each of these once.
Entries are keyed by *content*: the backbone and weights by name, or by path, size and modification time when they
are files (a rewritten checkpoint is a new entry); the data by dataset, root, shots, seed, views and test cap. They
are frozen inputs — CLIP is frozen, features are read-only tensors — and everything a trial changes (its context,
optimiser, RNG, the ``CachedViews`` epoch state) is built fresh per trial by :func:`platform.worker.run_training`.

Memory is bounded: the cache holds at most ``max_models`` CLIPs and ``max_bytes`` of feature tensors
(``$COOP_WARM_CACHE_BYTES``, default 4 GiB; ``0`` turns the cache off), dropping the least recently used entries
first. The on-disk ``FeatureCache`` stays the shared source of truth across processes and machines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from coop_core import CachedViews, FeatureSet, RunFeatures, weights_identity

logger = logging.getLogger(__name__)

T = TypeVar("T")
FeaturesT = TypeVar("FeaturesT", RunFeatures, FeatureSet)
DEFAULT_MAX_BYTES = 4 * 1024**3
BYTES_ENV_VAR = "COOP_WARM_CACHE_BYTES"


def features_nbytes(features: RunFeatures | FeatureSet) -> int:
    """Bytes held by the tensors of a :class:`RunFeatures` or a :class:`FeatureSet` (what the cache budget counts)."""
    if isinstance(features, FeatureSet):
        return features.features.numel() * features.features.element_size()
    total = 0
    train = features.train
    if isinstance(train, CachedViews):
        total += train.views.numel() * train.views.element_size()
    for fs in (features.val, features.test):
        if fs is not None:
            total += fs.features.numel() * fs.features.element_size()
    return total


def fresh_copy(features: RunFeatures | FeatureSet) -> RunFeatures | FeatureSet:
    """The same tensors behind new per-trial wrappers (``CachedViews`` remembers the epoch it last drew views for;
    a :class:`FeatureSet` holds no state and is shared as it is)."""
    if isinstance(features, FeatureSet):
        return features
    train = features.train
    if isinstance(train, CachedViews):
        train = CachedViews(train.views, train.labels, seed=train.seed)
    return dataclasses.replace(features, train=train)


class ProcessCache:
    """A bounded, least-recently-used cache of a process's loaded models and data.

    Args:
        max_models: CLIP models kept at once.
        max_bytes: feature bytes kept at once; 0 disables caching (every call loads).
    """

    def __init__(self, max_models: int = 2, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._models: OrderedDict[Hashable, Any] = OrderedDict()
        self._small: OrderedDict[Hashable, Any] = OrderedDict()  # splits and few-shot splits (item lists)
        self._features: OrderedDict[Hashable, tuple[RunFeatures | FeatureSet, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _cached(self, store: OrderedDict, key: Hashable, load: Callable[[], T], limit: int) -> tuple[T, bool]:
        if self.enabled and key in store:
            store.move_to_end(key)
            self.hits += 1
            return store[key], True
        self.misses += 1
        value = load()
        if self.enabled:
            store[key] = value
            while len(store) > limit:
                old, _ = store.popitem(last=False)
                if store is self._models:
                    self._drop_features_of(old)
        return value, False

    def model(self, key: Hashable, load: Callable[[], T]) -> tuple[T, bool]:
        """The CLIP for ``key`` (see :func:`model_key`), loaded by ``load`` on a miss; also says whether it hit."""
        return self._cached(self._models, key, load, self.max_models)

    def small(self, key: Hashable, load: Callable[[], T], limit: int = 64) -> tuple[T, bool]:
        """A small value (dataset splits, a few-shot split) for ``key``."""
        return self._cached(self._small, key, load, limit)

    def features(self, key: tuple[Hashable, ...], load: Callable[[], FeaturesT]) -> tuple[FeaturesT, bool]:
        """Image features for ``key`` (whose first element is the model key): a run's :class:`RunFeatures`, with
        fresh per-trial wrappers, or an evaluation target's :class:`FeatureSet`."""
        if self.enabled and key in self._features:
            self._features.move_to_end(key)
            self.hits += 1
            return fresh_copy(self._features[key][0]), True
        self.misses += 1
        value = load()
        nbytes = features_nbytes(value)
        if self.enabled and nbytes <= self.max_bytes:
            self._features[key] = (value, nbytes)
            while sum(n for _, n in self._features.values()) > self.max_bytes:
                self._features.popitem(last=False)
        return fresh_copy(value), False

    def _drop_features_of(self, model_key: Hashable) -> None:
        for key in [k for k in self._features if k[0] == model_key]:
            del self._features[key]

    def nbytes(self) -> int:
        """Feature bytes held now."""
        return sum(n for _, n in self._features.values())

    def clear(self) -> None:
        self._models.clear()
        self._small.clear()
        self._features.clear()


def model_key(backbone: str, pretrained: str, device: torch.device) -> tuple[str, str, str]:
    """The content key of a CLIP: backbone and weights as names, or as (path, size, mtime) when they are files."""
    return weights_identity(backbone), weights_identity(pretrained), str(device)


def _max_bytes_from_env() -> int:
    raw = os.environ.get(BYTES_ENV_VAR)
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${BYTES_ENV_VAR} must be a byte count (0 disables the warm cache), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"${BYTES_ENV_VAR} must be >= 0, got {value}")
    return value


_PROCESS_CACHE: ProcessCache | None = None


def process_cache() -> ProcessCache:
    """This process's cache (created on first use, sized by ``$COOP_WARM_CACHE_BYTES``)."""
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None:
        _PROCESS_CACHE = ProcessCache(max_bytes=_max_bytes_from_env())
    return _PROCESS_CACHE
