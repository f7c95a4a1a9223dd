"""End-to-end CoOp on one dataset in one process: data -> features -> train -> evaluate -> saved prompts.

The platform layer calls the same pieces (``prepare_features``, ``build_model``) from inside Ray workers; this module
is what a single-process user or test calls.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coop_core.backbone import LoadedClip
from coop_core.config import MethodConfig, PromptConfig, TrainConfig, check_method_prompt
from coop_core.datasets import DatasetSplits, ImageListDataset, Item
from coop_core.datasets.base import unreadable_images
from coop_core.engine import Distributed, TrainState, eval_text_features, evaluate, train
from coop_core.features import (
    CachedViews,
    ExactImages,
    FeatureCache,
    FeatureSet,
    extract_readable,
    items_digest,
    weights_identity,
)
from coop_core.fewshot import FewShotSplits, registry_eval_items
from coop_core.methods import Objective, make_objective
from coop_core.model import CoCoOpModel, CoOpModel
from coop_core.transfer import transfer_context
from coop_core.transforms import describe, test_transform, train_transform
from coop_core.zeroshot import zeroshot_evaluate, zeroshot_text_features

logger = logging.getLogger(__name__)


@dataclass
class RunFeatures:
    """What training and evaluation read.

    registry: the dataset's registry evaluation set (``coop_core.fewshot.registry_eval_items``), measured with the
    test split; registry_set: the digest of its items (which images they are), None with it.
    skipped: how many images of each split (``train``, ``val``, ``test``) were left out because they could not be
    decoded (corrupt or truncated files; greyscale, palette and RGBA images are converted, not skipped).
    """

    train: CachedViews | ExactImages
    val: FeatureSet
    test: FeatureSet | None
    skipped: dict[str, int] = field(default_factory=dict)
    registry: FeatureSet | None = None
    registry_set: str | None = None


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
                 seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels and the indices into ``items`` of the images that could be read (cached together)."""
    start = counter.done

    def compute() -> dict[str, torch.Tensor]:
        ds = ImageListDataset(image_dir, items, transform, skip_unreadable=True)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)  # augmented views are reproducible for a given key
            feats, labels, kept = extract_readable(clip.model.visual, ds, batch_size=batch_size,
                                                   num_workers=loader_workers, device=device, on_batch=counter.add)
        return {"features": feats, "labels": labels, "kept": kept}

    out = cache.get_or_compute(key, compute) if cache is not None else compute()
    counter.add(start + len(items) - counter.done)  # a cache hit (or skipped images) counts its images at once
    kept = out.get("kept", torch.arange(len(items)))  # entries written before unreadable images were skipped
    return out["features"], out["labels"], kept


def _report_skipped(split: str, items: tuple[Item, ...], kept: torch.Tensor, image_dir: Path) -> int:
    n_skipped = len(items) - len(kept)
    if n_skipped:
        readable = set(kept.tolist())
        first = next(it for i, it in enumerate(items) if i not in readable)
        logger.warning("skipped %d of %d %s images that cannot be decoded (corrupt or truncated; first: %s); "
                       "replace or remove them from the split to use them", n_skipped, len(items), split,
                       image_dir / first.path)
    return n_skipped


def _base_key(clip: LoadedClip, splits: DatasetSplits) -> dict:
    return {"backbone": clip.model_name, "weights": weights_identity(clip.pretrained), "dataset": splits.name,
            "image_dir": str(splits.image_dir)}


def _evaluation_set(clip: LoadedClip, splits: DatasetSplits, split: str, items: tuple[Item, ...], *,
                    cache: FeatureCache | None, device: torch.device, batch_size: int, loader_workers: int,
                    counter: _ImageCounter) -> tuple[FeatureSet, int]:
    """Test-transform features of ``items`` through the cache, and how many of them could not be decoded."""
    test_tf = test_transform(clip.image_size, clip.mean, clip.std)
    key = _base_key(clip, splits) | {"items": items_digest(items), "transform": describe(test_tf)}
    feats, labels, kept = _feature_set(clip, items, splits.image_dir, test_tf, key=key, cache=cache, device=device,
                                       batch_size=batch_size, loader_workers=loader_workers, counter=counter)
    return FeatureSet(feats, labels), _report_skipped(split, items, kept, splits.image_dir)


def evaluation_features(
    clip: LoadedClip,
    splits: DatasetSplits,
    split: str = "test",
    *,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    loader_workers: int = 0,
    progress: Progress | None = None,
) -> tuple[FeatureSet, int]:
    """Features of one split of ``splits`` for evaluation (the test transform), through the same feature cache
    entries as :func:`prepare_features`: what evaluating learned prompts on another dataset or split reads.

    Returns:
        The features and how many images were left out because they could not be decoded.

    Raises:
        ValueError: no image of the split can be decoded, or the split is empty.
    """
    items = splits.split(split)
    if not items:
        raise ValueError(f"the {split} split of {splits.name} is empty: nothing to evaluate on")
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    counter = _ImageCounter(progress, len(items))
    return _evaluation_set(clip, splits, split, items, cache=cache, device=torch.device(device),
                           batch_size=batch_size, loader_workers=loader_workers, counter=counter)


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
    """Image features for training (cached views or exact), validation and test (with the registry evaluation set,
    ``with_test``), through the feature cache.

    Keys hold the backbone, weights identity, dataset, item list digest, transform and view seed, so every trial of a
    sweep and every DDP worker with the same data reuses the same entries. ``progress("features", done, total)``
    is called as images are encoded (or found in the cache), if given. Images that cannot be decoded are left out
    of their split and counted (a warning names the first); a class whose every training image is unreadable is an
    error.

    Raises:
        ValueError: no image of a split, or of one class's training images, can be decoded.
    """
    device = torch.device(device)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    base = _base_key(clip, splits)
    train_tf = train_transform(clip.image_size, clip.mean, clip.std)
    n_train_views = 0 if cfg.feature_mode == "exact" else cfg.n_views * len(fewshot.train)
    registry_items = tuple(registry_eval_items(splits.val)) if with_test else ()
    counter = _ImageCounter(progress, len(fewshot.val) + (len(splits.test) if with_test else 0) + len(registry_items)
                            + n_train_views)
    common = {"cache": cache, "device": device, "batch_size": batch_size, "loader_workers": cfg.loader_workers,
              "counter": counter}
    skipped: dict[str, int] = {}

    def eval_set(split: str, items: tuple[Item, ...]) -> FeatureSet:
        features, skipped[split] = _evaluation_set(clip, splits, split, items, **common)
        return features

    val = eval_set("val", fewshot.val)
    test = eval_set("test", splits.test) if with_test else None
    registry = None
    if registry_items:  # validation images (their undecodable ones are warned about, not counted again in skipped)
        registry, _ = _evaluation_set(clip, splits, "registry", registry_items, **common)
    if cfg.feature_mode == "exact":
        bad = set(unreadable_images(splits.image_dir, fewshot.train))
        readable = tuple(it for it in fewshot.train if it not in bad)
        kept = torch.tensor([i for i, it in enumerate(fewshot.train) if it not in bad], dtype=torch.long)
        skipped["train"] = _report_skipped("train", fewshot.train, kept, splits.image_dir)
        if not readable:
            raise ValueError(f"none of the {len(fewshot.train)} training images can be decoded")
        train_labels = torch.tensor([it.label for it in readable], dtype=torch.long)
        ds = ImageListDataset(splits.image_dir, readable, train_tf)
        model_visual = clip.model.visual.to(device)

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.nn.functional.normalize(model_visual(images).float(), dim=-1)

        source: CachedViews | ExactImages = ExactImages(ds, train_labels, encode, device)
    else:
        views, kept, train_labels = [], None, None
        for v in range(cfg.n_views):
            key = base | {"items": items_digest(fewshot.train), "transform": describe(train_tf), "view": v,
                          "view_seed": cfg.seed}
            feats, labels, kept_v = _feature_set(clip, fewshot.train, splits.image_dir, train_tf, key=key,
                                                 seed=cfg.seed * 100_003 + v, **common)
            if kept is not None and not torch.equal(kept_v, kept):
                raise ValueError(f"training view {v} could read other images than view 0 (is the data changing?); "
                                 "clear the feature cache and run again")
            views.append(feats)
            kept, train_labels = kept_v, labels
        skipped["train"] = _report_skipped("train", fewshot.train, kept, splits.image_dir)
        source = CachedViews(torch.stack(views), train_labels, seed=cfg.seed)  # (n_views, n, d)
    lost = sorted({it.label for it in fewshot.train} - set(train_labels.tolist()))
    if lost:
        raise ValueError(f"every training image of class {splits.classnames[lost[0]]!r} is unreadable (corrupt or "
                         "truncated files): CoOp cannot learn it; replace the images")
    return RunFeatures(source, val, test, skipped, registry,
                       items_digest(registry_items) if registry is not None else None)


def build_model(clip: LoadedClip, classnames: tuple[str, ...] | list[str], prompt: PromptConfig, seed: int,
                device: str | torch.device = "cpu", truncate_text: bool = True,
                method: MethodConfig | None = None) -> CoOpModel:
    """The method's model (a ``CoCoOpModel`` for CoCoOp, else a ``CoOpModel``) with its learned vectors initialised
    from ``seed`` (identical on every worker).

    Raises:
        ValueError: the prompt does not fit the method (``coop_core.config.check_method_prompt``).
    """
    method = method or MethodConfig()
    check_method_prompt(method, prompt)
    g = torch.Generator().manual_seed(seed)
    if method.name == "cocoop":
        return CoCoOpModel(clip.model, clip.tokenizer, classnames, prompt, meta_net_ratio=method.meta_net_ratio,
                           truncate_text=truncate_text, generator=g).to(device)
    return CoOpModel(clip.model, clip.tokenizer, classnames, prompt, truncate_text=truncate_text,
                     generator=g).to(device)


def build_objective(method: MethodConfig, model: CoOpModel, clip: LoadedClip, template: str) -> Objective:
    """The method's training objective for ``model``; KgCoOp's and ProGrad's anchors are zero-shot CLIP's text
    features of ``template`` (the dataset's hand-crafted prompt) for the model's classes."""
    anchors = None
    if method.name in ("kgcoop", "prograd"):
        anchors = zeroshot_text_features(clip.model, clip.tokenizer, model.classnames, template)  # (n_cls, d)
    return make_objective(method, model, anchors)


def prompt_model(clip: LoadedClip, ctx: torch.Tensor, prompt: PromptConfig, source_classnames: Sequence[str],
                 classnames: Sequence[str], device: str | torch.device = "cpu", method: MethodConfig | None = None,
                 learned: Mapping[str, torch.Tensor] | None = None) -> CoOpModel:
    """The method's model for ``classnames`` carrying learned prompts (trained for ``source_classnames``).

    A unified context serves any class list; a class-specific one is mapped to the target classes by name
    (:func:`coop_core.transfer.transfer_context`, which refuses classes it has no vector for). ``learned`` is what the
    method learned besides (CoCoOp's meta-net, ``CoOpModel.learned_state``).

    Raises:
        PromptTransferError: a class-specific context and a class it was not trained on.
        ValueError: ``learned`` does not fit the method's model.
    """
    ctx = transfer_context(ctx, source_classnames, prompt.csc, classnames)
    # the learned vectors replace any initialisation
    prompt = dataclasses.replace(prompt, n_ctx=ctx.shape[-2], ctx_init="", pad_ctx_init=False)
    model = build_model(clip, tuple(classnames), prompt, seed=0, device=device, method=method)
    with torch.no_grad():
        model.prompt_learner.ctx.copy_(ctx.to(model.prompt_learner.ctx.device))
    model.load_learned_state({k: v.to(model.prompt_learner.ctx.device) for k, v in (learned or {}).items()})
    return model


@dataclass(frozen=True)
class FinalEvaluation:
    """A trained run's last-epoch measurements, accuracies in percent (``{"acc", "macro_f1"}`` each): the learned
    prompts and zero-shot CLIP on the test split, and the prompts on the registry evaluation set (None where the run's
    features have none)."""

    test: dict[str, float]
    zeroshot_test: dict[str, float]
    registry: dict[str, float] | None


def evaluate_final(model: CoOpModel, clip: LoadedClip, splits: DatasetSplits, feats: RunFeatures,
                   precision: str = "fp32", zeroshot: Callable[[], dict[str, float]] | None = None
                   ) -> FinalEvaluation:
    """What every run measures after its last epoch (:class:`FinalEvaluation`); ``feats`` must hold the test split
    (``prepare_features(..., with_test=True)``). ``zeroshot``: where the caller keeps zero-shot CLIP's test result,
    which depends on CLIP, the class names, the template and the test split only (runs that share those, such as a
    pack's members, measure it once); computed here by default."""
    if feats.test is None:
        raise ValueError("the final evaluation needs the test split's features (prepare_features with_test=True)")
    text = eval_text_features(model, precision)  # one text pass for the test and registry sets
    test = evaluate(model, feats.test, precision, text=text)
    zeroshot = zeroshot() if zeroshot is not None else zeroshot_evaluate(
        clip.model, clip.tokenizer, splits.classnames, splits.template, feats.test)
    registry = evaluate(model, feats.registry, precision, text=text) if feats.registry is not None else None
    return FinalEvaluation(test, zeroshot, registry)


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
    method: MethodConfig | None = None,
) -> RunResult:
    """Train the prompts with ``method`` (CoOp by default) on the few-shot split and evaluate the last epoch on val and
    test (plus the zero-shot baseline)."""
    device = torch.device(device)
    method = method or MethodConfig()
    clip.model.to(device)
    feats = prepare_features(clip, splits, fewshot, cfg, cache_dir=cache_dir, device=device, with_test=with_test)
    model = build_model(clip, splits.classnames, prompt, cfg.seed, device, method=method)
    objective = build_objective(method, model, clip, splits.template)
    history = train(model, feats.train, cfg, val=feats.val, dist=dist, report=report, on_epoch_end=on_epoch_end,
                    resume=resume, objective=objective)
    val = evaluate(model, feats.val, cfg.precision)
    if feats.test is None:
        return RunResult(model, history, val, None, None)
    final = evaluate_final(model, clip, splits, feats, cfg.precision)
    return RunResult(model, history, val, final.test, final.zeroshot_test if zeroshot else None)
