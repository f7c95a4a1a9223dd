"""Zero-shot CLIP with a hand-crafted prompt template: the baseline CoOp has to beat."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coop_core.engine import macro_f1
from coop_core.features import FeatureSet
from coop_core.prompt_learner import clean_classname


@torch.no_grad()
def zeroshot_text_features(
    clip: nn.Module, tokenizer: Callable, classnames: Sequence[str], template: str
) -> torch.Tensor:
    """Normalised text features ``(n_cls, d)`` of ``template.format(classname)`` for every class."""
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the class name goes, got {template!r}")
    device = next(clip.parameters()).device
    tokens = tokenizer([template.format(clean_classname(c)) for c in classnames]).to(device)  # (n_cls, seq)
    return F.normalize(clip.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def zeroshot_evaluate(clip: nn.Module, tokenizer: Callable, classnames: Sequence[str], template: str,
                      data: FeatureSet) -> dict[str, float]:
    """Accuracy (%) and macro-F1 (%) of the zero-shot classifier on normalised image features."""
    text = zeroshot_text_features(clip, tokenizer, classnames, template)
    pred = (data.features.to(text.device).float() @ text.t()).argmax(dim=-1).cpu()
    target = data.labels.cpu()
    return {
        "acc": 100.0 * int((pred == target).sum()) / max(len(target), 1),  # exact: 7 of 70 is 10.0, not 10.0000001
        "macro_f1": 100.0 * macro_f1(pred, target, len(classnames)),
    }
