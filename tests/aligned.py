"""The tests' ridge-aligned tiny CLIP: zero-shot prompts that mean something on real EuroSAT, in seconds.

With random weights every prompt is as good as any other and zero-shot CLIP sits at chance, so a sweep could not tell
a better configuration from a worse one and a study's curve and zero-shot line would be noise. Contrastive pretraining
would take minutes on 2 cores; instead :func:`aligned_tiny_checkpoint` keeps the tiny ViT's random weights except the
image projection, fitted by ridge regression so that EuroSAT *train* images land on their class's zero-shot text
feature. Zero-shot accuracy is then well above chance and below what the features allow, which is CoOp's setting.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGES_PER_CLASS = 30  # train images per class the projection is fitted on (never test images)


def aligned_tiny_checkpoint(config_json: str, data_root: Path, out: Path) -> Path:
    """Tiny ViT weights whose image projection maps EuroSAT train images onto their class's zero-shot text feature.

    Random weights, except ``visual.proj``: the ridge-regression solution from pooled image features (before the
    projection) of 30 train images per class to the normalised text features of "a centered satellite photo of
    <class>.". That gives the frozen CLIP a zero-shot accuracy well above chance in a few seconds of CPU.
    """
    from PIL import Image

    from coop_core.backbone import load_clip
    from coop_core.datasets import load_dataset
    from coop_core.transforms import test_transform

    clip = load_clip(config_json, "none")
    model = clip.model
    splits = load_dataset("eurosat", data_root)
    by_label: dict[int, list] = {}
    for item in splits.train:
        by_label.setdefault(item.label, []).append(item)
    rng = random.Random(0)
    items = [it for label in sorted(by_label) for it in rng.sample(sorted(by_label[label], key=lambda i: i.path),
                                                                   IMAGES_PER_CLASS)]
    transform = test_transform(clip.image_size, clip.mean, clip.std)
    images = torch.stack([transform(Image.open(splits.image_dir / it.path).convert("RGB")) for it in items])
    labels = torch.tensor([it.label for it in items])
    with torch.no_grad():
        proj, model.visual.proj = model.visual.proj, None
        pooled = model.visual(images)  # (n, width), before the projection
        model.visual.proj = proj
        prompts = clip.tokenizer([splits.template.format(c) for c in splits.classnames])
        text = F.normalize(model.encode_text(prompts), dim=-1)  # (n_cls, embed_dim)
        gram = pooled.T @ pooled + 0.01 * torch.eye(pooled.shape[1])
        model.visual.proj.copy_(torch.linalg.solve(gram, pooled.T @ text[labels]))  # (width, embed_dim)
    torch.save(model.state_dict(), out)
    return out
