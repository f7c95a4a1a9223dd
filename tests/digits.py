"""A tiny CLIP that knows something: contrastively trained on scikit-learn's handwritten digits, in seconds on CPU.

The learning tests need a CLIP whose hand-crafted zero-shot prompt is meaningful but imperfect, so that CoOp has
something to learn. We train one from scratch on real data, ``sklearn.datasets.load_digits`` (1,797 8x8 scans, ten
classes, upsampled to 16x16 for a ViT with 4x4 patches), with captions in three phrasings: "seven", "handwritten
seven", "the digit seven written by hand". The zero-shot template, "a photo of the number {}.", is plausible but
never seen verbatim ("photo", "number" and the full stop never occur in a caption): zero-shot is far above chance
(~40 %) and far below what the image features allow (~85 % with a caption phrasing), which is CoOp's setting.

The digits are split, disjointly and per class, into a CLIP-pretraining pool, a few-shot pool (CoOp's train and val
candidates) and a held-out test set. Images are written as PNG files and described by a real ``DatasetSplits``, so
the learning tests run the real pipeline: image files -> transforms -> feature cache -> CoOp -> evaluation.

``build_world`` caches the pretrained checkpoint on disk, keyed by a hash of this file, the recipe and the library
versions, so repeated test runs skip pretraining; it is written atomically, so concurrent sessions may share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from coop_core.datasets import DatasetSplits, Item
from coop_core.transforms import test_transform

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings seen while pretraining CLIP; the zero-shot template below is none of them.
PRETRAIN_CAPTIONS = ("{}", "handwritten {}", "the digit {} written by hand")
ZEROSHOT_TEMPLATE = "a photo of the number {}."
DATASET_NAME = "digits"

MODEL_NAME = "digits-vit"
MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 4, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# Per class: how many digits go to CLIP pretraining, to the few-shot pool (train / val candidates) and to the test set.
# Every class of load_digits has >= 174 images.
N_PRETRAIN = 100
N_FEWSHOT_TRAIN = 24
N_FEWSHOT_VAL = 8
N_TEST = 40
SPLIT_SEED = 0

PRETRAIN = {"epochs": 50, "batch_size": 200, "lr": 2e-3, "lr_logit_scale": 2e-2, "weight_decay": 0.1, "p_augment": 0.8,
            "seed": 0}


@dataclass(frozen=True)
class DigitsWorld:
    """Everything a learning test needs.

    root: folder holding the images, the model config and the checkpoint.
    config_path: open_clip model-config JSON (``load_clip(config_path, checkpoint)``).
    checkpoint: the pretrained CLIP's state dict.
    splits: the real ``DatasetSplits``: train = few-shot train pool, val = few-shot val pool, test = held-out test.
    """

    root: Path
    config_path: Path
    checkpoint: Path
    splits: DatasetSplits


def split_indices(labels: np.ndarray, seed: int | None = None) -> dict[str, list[int]]:
    """Disjoint per-class index lists for pretraining, few-shot train/val pools and test."""
    rng = random.Random(SPLIT_SEED if seed is None else seed)
    out: dict[str, list[int]] = {"pretrain": [], "train": [], "val": [], "test": []}
    sizes = {"pretrain": N_PRETRAIN, "train": N_FEWSHOT_TRAIN, "val": N_FEWSHOT_VAL, "test": N_TEST}
    for c in range(len(CLASSNAMES)):
        idx = [int(i) for i in np.flatnonzero(labels == c)]
        rng.shuffle(idx)
        start = 0
        for name, size in sizes.items():
            out[name] += idx[start : start + size]
            start += size
        assert start <= len(idx), f"class {c} has only {len(idx)} images"
    return out


def to_pil(image: np.ndarray) -> Image.Image:
    """An 8x8 digit (values 0..16) as an 8-bit grayscale image: dark ink on white, like a scan."""
    return Image.fromarray((255 - image * 255.0 / 16.0).round().astype(np.uint8), mode="L")


def source_hash() -> str:
    """Key of the pretrained checkpoint: this file, the recipe and the library versions."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    recipe = [MODEL_CONFIG, PRETRAIN, PRETRAIN_CAPTIONS, N_PRETRAIN, SPLIT_SEED]
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(f"{torch.__version__} {open_clip.__version__}".encode())
    return h.hexdigest()[:16]


def random_resized_crop_flip(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Batched random-resized-crop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, as CoOp's train transform.

    One ``grid_sample`` for the whole batch, so every pretraining step sees fresh views for free; bilinear rather than
    torchvision's bicubic, which does not matter for robustness.
    """
    b = images.shape[0]
    scale = torch.empty(b).uniform_(0.08, 1.0, generator=g)
    ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    w = torch.sqrt(scale * ratio).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", align_corners=False)  # (b, 3, s, s)


def pretrain_clip(images: torch.Tensor, labels: torch.Tensor, config_path: Path) -> dict[str, torch.Tensor]:
    """Train the tiny CLIP contrastively on (image, random caption) pairs; returns its state dict.

    The loss is CLIP's symmetric InfoNCE over the batch, except that pairs of the same digit count as positives
    (soft targets): with ten classes a batch holds many same-digit pairs, and pushing those apart is pure noise.
    The token embedding stays at its random initialisation, so words never seen in a caption ("photo", "number") are
    as meaningless to this CLIP as to an untrained one, and only the transformers and projections learn. The text
    features of the few distinct captions are computed once per step and gathered per pair (same maths, less work).
    Most images are randomly cropped and flipped like CoOp's training views: CoOp trains on such views, and a real
    CLIP is robust to them.

    Args:
        images: images after the real pipeline's test transform ``(n, 3, s, s)``.
        labels: digit of each image ``(n,)``.
        config_path: the model-config JSON.
    """
    open_clip.add_model_config(config_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAIN["seed"])
        model = open_clip.create_model(MODEL_NAME, pretrained=None)
        model.token_embedding.requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        captions = [t.format(c) for c in CLASSNAMES for t in PRETRAIN_CAPTIONS]
        tokens = tokenizer(captions)  # (n_cls * n_captions, seq), class-major
        n_cap = len(PRETRAIN_CAPTIONS)
        params = [p for n, p in model.named_parameters() if p.requires_grad and n != "logit_scale"]
        scale_group = {"params": [model.logit_scale], "lr": PRETRAIN["lr_logit_scale"], "weight_decay": 0.0}
        opt = torch.optim.AdamW([{"params": params}, scale_group], lr=PRETRAIN["lr"],
                                weight_decay=PRETRAIN["weight_decay"])
        g = torch.Generator().manual_seed(PRETRAIN["seed"])
        n, bs = len(labels), PRETRAIN["batch_size"]
        steps_per_epoch = n // bs
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, [PRETRAIN["lr"], PRETRAIN["lr_logit_scale"]],
                                                    total_steps=PRETRAIN["epochs"] * steps_per_epoch, pct_start=0.1)
        model.train()
        for _ in range(PRETRAIN["epochs"]):
            for batch in torch.randperm(n, generator=g)[: steps_per_epoch * bs].split(bs):
                y = labels[batch]
                caption = y * n_cap + torch.randint(n_cap, (bs,), generator=g)  # one random caption per image
                x = images[batch]
                augment = torch.rand(bs, generator=g) < PRETRAIN["p_augment"]
                x = torch.where(augment[:, None, None, None], random_resized_crop_flip(x, g), x)
                img = F.normalize(model.encode_image(x), dim=-1)  # (b, d)
                txt = F.normalize(model.encode_text(tokens), dim=-1)[caption]  # (b, d)
                logits = model.logit_scale.exp() * img @ txt.t()  # (b, b)
                same = (y[:, None] == y[None, :]).float()
                target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
                loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                              - (target * logits.log_softmax(0)).sum(0).mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread: these tensors are tiny (threads only add overhead and contention on shared CI
    cores) and a fixed thread count keeps the floating-point results the same on every machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _atomic_save(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_world(root: Path, checkpoint_cache: Path | None = None) -> DigitsWorld:
    """Write the digit PNGs and model config under ``root``, pretrain (or reuse) the CLIP, build the splits.

    Args:
        root: an empty folder for this session.
        checkpoint_cache: folder for the pretrained checkpoint, shared between sessions; None trains every time.
    """
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images, labels = digits.images, digits.target
    parts = split_indices(labels)

    image_dir = root / "images"
    items: dict[str, tuple] = {}
    for split in ("train", "val", "test"):
        rows = []
        for i in parts[split]:
            rel = f"{CLASSNAMES[labels[i]]}/{i:04d}.png"
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            to_pil(images[i]).save(image_dir / rel)
            rows.append(Item(rel, int(labels[i]), CLASSNAMES[labels[i]]))
        items[split] = tuple(rows)
    splits = DatasetSplits(DATASET_NAME, image_dir.resolve(), CLASSNAMES, ZEROSHOT_TEMPLATE,
                           items["train"], items["val"], items["test"])

    config_path = root / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(MODEL_CONFIG))
    key = source_hash()
    cache_dir = checkpoint_cache if checkpoint_cache is not None else root
    cache_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cache_dir / f"{MODEL_NAME}-{key}.pt"
    if not checkpoint.is_file():
        size = MODEL_CONFIG["vision_cfg"]["image_size"]
        norm = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        tf = test_transform(size, *norm)
        pre = torch.stack([tf(to_pil(images[i]).convert("RGB")) for i in parts["pretrain"]])  # (n, 3, s, s)
        with single_thread():
            state = pretrain_clip(pre, torch.as_tensor(labels[parts["pretrain"]]), config_path)
        _atomic_save(state, checkpoint)
    return DigitsWorld(root, config_path, checkpoint, splits)
