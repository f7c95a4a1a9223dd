"""End-to-end CoOp on one dataset in one process: data -> features -> train -> evaluate -> saved prompts.

The platform layer calls the same pieces (``prepare_features``, ``build_model``) from inside Ray workers; this module
is what a single-process user or test calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from coop_core.backbone import LoadedClip
from coop_core.config import PromptConfig, TrainConfig
from coop_core.datasets import DatasetSplits, ImageListDataset, Item
from coop_core.engine import Distributed, TrainState, evaluate, train
from coop_core.features import (
    CachedViews,
    ExactImages,
    FeatureCache,
    FeatureSet,
    extract_features,
    items_digest,
    weights_identity,
)
from coop_core.fewshot import FewShotSplits
from coop_core.model import CoOpModel
from coop_core.transforms import describe, test_transform, train_transform
from coop_core.zeroshot import zeroshot_evaluate

logger = logging.getLogger(__name__)


@dataclass
class RunFeatures:
    """What training and evaluation read."""

    train: CachedViews | ExactImages
    val: FeatureSet
    test: FeatureSet | None


# A progress callback: ``progress(task, done, total)``; ``prepare_features`` reports task "features" in images.
Progress = Callable[[str, int, int], None]


class _ImageCounter:
    """Counts the images of all feature sets of a run, computed or read from the cache, for ``progress``."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.progress is not None:
            self.progress("features", self.done, self.total)


def _feature_set(clip: LoadedClip, items: tuple[Item, ...], image_dir: Path, transform, *, cache: FeatureCache | None,
                 key: dict, device: torch.device, batch_size: int, loader_workers: int, counter: _ImageCounter,
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    start = counter.done

    def compute() -> dict[str, torch.Tensor]:
        ds = ImageListDataset(image_dir, items, transform)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)  # augmented views are reproducible for a given key
            feats, labels = extract_features(clip.model.visual, ds, batch_size=batch_size, num_workers=loader_workers,
                                             device=device, on_batch=counter.add)
        return {"features": feats, "labels": labels}

    out = cache.get_or_compute(key, compute) if cache is not None else compute()
    counter.add(start + len(items) - counter.done)  # a cache hit counts its images at once
    return out["features"], out["labels"]


def prepare_features(
    clip: LoadedClip,
    splits: DatasetSplits,
    fewshot: FewShotSplits,
    cfg: TrainConfig,
    *,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    with_test: bool = True,
    batch_size: int = 128,
    progress: Progress | None = None,
) -> RunFeatures:
    """Image features for training (cached views or exact), validation and test, through the feature cache.

    Keys hold the backbone, weights identity, dataset, item list digest, transform and view seed, so every trial of a
    sweep and every DDP worker with the same data reuses the same entries. ``progress("features", done, total)``
    is called as images are encoded (or found in the cache), if given.
    """
    device = torch.device(device)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    base = {"backbone": clip.model_name, "weights": weights_identity(clip.pretrained), "dataset": splits.name,
            "image_dir": str(splits.image_dir)}
    test_tf = test_transform(clip.image_size, clip.mean, clip.std)
    train_tf = train_transform(clip.image_size, clip.mean, clip.std)
    n_train_views = 0 if cfg.feature_mode == "exact" else cfg.n_views * len(fewshot.train)
    counter = _ImageCounter(progress, len(fewshot.val) + (len(splits.test) if with_test else 0) + n_train_views)
    common = {"cache": cache, "device": device, "batch_size": batch_size, "loader_workers": cfg.loader_workers,
              "counter": counter}

    def eval_set(items: tuple[Item, ...]) -> FeatureSet:
        key = base | {"items": items_digest(items), "transform": describe(test_tf)}
        feats, labels = _feature_set(clip, items, splits.image_dir, test_tf, key=key, **common)
        return FeatureSet(feats, labels)

    val = eval_set(fewshot.val)
    test = eval_set(splits.test) if with_test else None
    train_labels = torch.tensor([it.label for it in fewshot.train], dtype=torch.long)
    if cfg.feature_mode == "exact":
        ds = ImageListDataset(splits.image_dir, fewshot.train, train_tf)
        model_visual = clip.model.visual.to(device)

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.nn.functional.normalize(model_visual(images).float(), dim=-1)

        source: CachedViews | ExactImages = ExactImages(ds, train_labels, encode, device)
    else:
        views = []
        for v in range(cfg.n_views):
            key = base | {"items": items_digest(fewshot.train), "transform": describe(train_tf), "view": v,
                          "view_seed": cfg.seed}
            feats, _ = _feature_set(clip, fewshot.train, splits.image_dir, train_tf, key=key,
                                    seed=cfg.seed * 100_003 + v, **common)
            views.append(feats)
        source = CachedViews(torch.stack(views), train_labels, seed=cfg.seed)  # (n_views, n, d)
    return RunFeatures(source, val, test)


def build_model(clip: LoadedClip, classnames: tuple[str, ...] | list[str], prompt: PromptConfig, seed: int,
                device: str | torch.device = "cpu", truncate_text: bool = True) -> CoOpModel:
    """A CoOp model with its context initialised from ``seed`` (identical on every worker)."""
    g = torch.Generator().manual_seed(seed)
    return CoOpModel(clip.model, clip.tokenizer, classnames, prompt, truncate_text=truncate_text,
                     generator=g).to(device)


@dataclass
class RunResult:
    """Outcome of one CoOp run; accuracies in percent."""

    model: CoOpModel
    history: list[dict[str, float]]
    val: dict[str, float]
    test: dict[str, float] | None
    zeroshot_test: dict[str, float] | None


def run_coop(
    clip: LoadedClip,
    splits: DatasetSplits,
    fewshot: FewShotSplits,
    prompt: PromptConfig,
    cfg: TrainConfig,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dist: Distributed | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    resume: TrainState | None = None,
    with_test: bool = True,
    zeroshot: bool = True,
) -> RunResult:
    """Train CoOp on the few-shot split and evaluate the last epoch on val and test (plus the zero-shot baseline)."""
    device = torch.device(device)
    clip.model.to(device)
    feats = prepare_features(clip, splits, fewshot, cfg, cache_dir=cache_dir, device=device, with_test=with_test)
    model = build_model(clip, splits.classnames, prompt, cfg.seed, device)
    history = train(model, feats.train, cfg, val=feats.val, dist=dist, report=report, on_epoch_end=on_epoch_end,
                    resume=resume)
    val = evaluate(model, feats.val, cfg.precision)
    test = evaluate(model, feats.test, cfg.precision) if feats.test is not None else None
    zs = None
    if zeroshot and feats.test is not None:
        zs = zeroshot_evaluate(clip.model, clip.tokenizer, splits.classnames, splits.template, feats.test)
    return RunResult(model, history, val, test, zs)
