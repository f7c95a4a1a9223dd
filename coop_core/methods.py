"""The prompt learners on one engine: what each method adds to CoOp's training step.

CoOp and its successors that keep CLIP frozen and learn only vectors differ in little: a term added to the loss
(KgCoOp), a rule for the gradient (ProGrad), or a prompt that depends on the image (CoCoOp, its model is
``coop_core.model.CoCoOpModel``; its step is CoOp's). So a method is an :class:`Objective`, a small object the engine
asks for the step's loss terms and then to turn them into gradients; the loop, the data, the optimiser and its
schedule, distribution, checkpoints and evaluation stay ``coop_core.engine``'s. Definitions follow the references:

- **KgCoOp** (Yao et al., CVPR'23; ``KgCoOp/trainers/kgcoop.py`` in htyao89/KgCoOp): ``loss = CE + w * (1 - mean_c
  cos(w_c, w_c^clip))``, where ``w_c`` is class ``c``'s (normalised) text feature from the learned prompt and
  ``w_c^clip`` the frozen CLIP's feature of the dataset's hand-crafted prompt; the mean is over every class.
- **ProGrad** (Zhu et al., ICCV'23; ``prograd_backward_and_update`` in BeierZhu/Prompt-align's
  ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``, ``ProGradLoss`` in ``ProGrad.public/trainers/prograd.py``): the
  gradient ``g`` of the cross-entropy and ``g_kl`` of ``T^2 * CE(softmax(z_zs / T), log_softmax(z / T))`` toward
  zero-shot CLIP's logits ``z_zs`` (same images, hand-crafted prompts); where they conflict (``cos(g, g_kl) < 0``)
  the step follows ``g - lambda * (g . g_kl_hat) g_kl_hat``, else ``g``; per parameter tensor, before the optimiser
  adds weight decay.
- **CoCoOp** (Zhou et al., CVPR'22; ``trainers/cocoop.py`` in KaiyangZhou/CoOp): cross-entropy; the context and the
  meta-net train together.

In a multi-worker run every loss term is a sum over the worker's share of the global batch divided by the global
batch size (terms over all classes, like KgCoOp's, are divided by the number of workers), and the injected ``reduce``
sums gradients over workers, so N workers take one worker's steps; ProGrad reduces each of its two gradients before
it compares them, as one process would see them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from coop_core.config import MethodConfig
from coop_core.model import CoOpModel

Scale = Callable[[torch.Tensor], torch.Tensor]  # a loss scaler's ``scale`` (identity without one)
Reduce = Callable[[torch.Tensor], None]  # sums a gradient over workers in place (identity in one process)


class Objective:
    """CoOp's objective: the cross-entropy of the step's logits. Subclasses add terms or change the gradient.

    ``terms`` returns the step's named loss terms, ``"ce"`` first (the summed cross-entropy of the worker's share
    over the global batch size: what every method reports as ``train_loss``); ``backward`` leaves each trainable
    parameter's gradient, summed over workers, in ``.grad``.
    """

    def terms(self, model: CoOpModel, logits: torch.Tensor, labels: torch.Tensor, image_features: torch.Tensor,
              text_features: torch.Tensor | None, n_global: int, world_size: int) -> dict[str, torch.Tensor]:
        """The step's loss terms.

        Args:
            logits: the worker's share of the batch, ``(b, n_cls)`` in float32. labels: ``(b,)``.
            image_features: their normalised features ``(b, d)``. text_features: the normalised class features
                ``(n_cls, d)`` of the step (None for an image-conditioned model).
            n_global: the global batch size. world_size: workers sharing the batch.
        """
        return {"ce": F.cross_entropy(logits, labels, reduction="sum") / n_global}

    def backward(self, terms: dict[str, torch.Tensor], params: Sequence[torch.nn.Parameter], scale: Scale,
                 reduce: Reduce) -> None:
        """Gradients of the summed terms, reduced over workers."""
        scale(sum(terms.values())).backward()
        for p in params:
            reduce(p.grad)


class KgCoOp(Objective):
    """KgCoOp: CoOp's cross-entropy plus ``weight * (1 - mean_c cos(w_c, w_c^clip))`` (term ``"kg"``).

    Args:
        anchors: the frozen CLIP's normalised text features of the hand-crafted prompt, ``(n_cls, d)``
            (``coop_core.zeroshot.zeroshot_text_features``), in the model's class order.
        weight: the term's weight (8.0 in the reference's base-to-new runs).
    """

    def __init__(self, anchors: torch.Tensor, weight: float) -> None:
        self.anchors = anchors.detach()
        self.weight = weight

    def terms(self, model, logits, labels, image_features, text_features, n_global, world_size):
        terms = super().terms(model, logits, labels, image_features, text_features, n_global, world_size)
        cos = F.cosine_similarity(text_features.float(), self.anchors.to(text_features.device), dim=1, eps=1e-7)
        terms["kg"] = self.weight * (1.0 - cos.mean()) / world_size  # (every worker holds every class's features)
        return terms


class ProGrad(Objective):
    """ProGrad: the cross-entropy's gradient, projected off the zero-shot distillation gradient where they conflict.

    Args:
        anchors: the frozen CLIP's normalised text features of the hand-crafted prompt ``(n_cls, d)``: zero-shot
            CLIP's classifier, the teacher.
        lam: lambda, the share of the conflicting component removed (1.0 in the reference).
        temperature: T of the distillation (1.0 in the reference).
    """

    def __init__(self, anchors: torch.Tensor, lam: float, temperature: float) -> None:
        self.anchors = anchors.detach()
        self.lam = lam
        self.temperature = temperature

    def terms(self, model, logits, labels, image_features, text_features, n_global, world_size):
        terms = super().terms(model, logits, labels, image_features, text_features, n_global, world_size)
        with torch.no_grad():
            teacher = model.logit_scale.exp() * image_features.float() @ self.anchors.to(logits.device).t()  # (b, n)
        t = self.temperature
        soft = F.softmax(teacher / t, dim=-1)  # (b, n_cls)
        kl = -(soft * F.log_softmax(logits / t, dim=-1)).sum(1) * t * t  # (b,)
        terms["kl"] = kl.sum() / n_global
        return terms

    def backward(self, terms, params, scale, reduce):
        scale(terms["kl"]).backward(retain_graph=True)
        kl_grads = []
        for p in params:
            reduce(p.grad)
            kl_grads.append(p.grad.clone())
            p.grad.zero_()
        scale(terms["ce"]).backward()
        for p, g_kl in zip(params, kl_grads):
            reduce(p.grad)
            g = p.grad
            g_kl_hat = g_kl / torch.linalg.norm(g_kl)
            # The reference's test, as it writes it: a zero gradient gives NaN here, which compares False (no change).
            if torch.dot((g / torch.linalg.norm(g)).flatten(), g_kl_hat.flatten()) < 0:
                p.grad = g - self.lam * torch.dot(g.flatten(), g_kl_hat.flatten()) * g_kl_hat


def make_objective(method: MethodConfig, model: CoOpModel, anchors: torch.Tensor | None = None) -> Objective:
    """The :class:`Objective` of ``method`` for ``model``.

    Args:
        anchors: KgCoOp's and ProGrad's zero-shot CLIP text features of the dataset's hand-crafted prompt for the
            model's classes, ``(n_cls, d)`` normalised (``coop_core.pipeline.build_objective`` computes them).

    Raises:
        ValueError: the model does not fit the method (CoCoOp needs a ``CoCoOpModel``, the others a ``CoOpModel``),
            or KgCoOp/ProGrad without anchors for every class.
    """
    if model.conditional != (method.name == "cocoop"):
        raise ValueError(f"method {method.name!r} needs {'a CoCoOpModel' if method.name == 'cocoop' else 'a CoOpModel'}"
                         f", got {type(model).__name__} (build it with coop_core.pipeline.build_model)")
    if method.name in ("coop", "cocoop"):
        return Objective()
    if anchors is None or anchors.shape[0] != model.prompt_learner.n_cls:
        raise ValueError(f"{method.name} needs zero-shot text features of every class ({model.prompt_learner.n_cls}), "
                         f"got {None if anchors is None else tuple(anchors.shape)}")
    if method.name == "kgcoop":
        return KgCoOp(anchors, method.kg_weight)
    return ProGrad(anchors, method.prograd_lambda, method.prograd_temperature)
