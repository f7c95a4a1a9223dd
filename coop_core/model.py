"""CoOp classifier: a frozen CLIP whose class prompts carry learned context."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coop_core.config import PromptConfig
from coop_core.prompt_learner import PromptLearner
from coop_core.text_encoder import TextEncoder, text_tower


class CoOpModel(nn.Module):
    """Image -> class logits with learnable prompts; everything but ``prompt_learner.ctx`` is frozen.

    Logits are ``logit_scale.exp() * cosine(image_feature, text_feature)`` as in CLIP and CoOp. Training works on
    image *features* (``forward_features``): the image encoder is frozen, so its output can come from the encoder on
    the fly (exact mode) or from a cache, with identical gradients for the context.

    Args:
        clip: an open_clip ``CLIP`` or ``CustomTextCLIP`` (frozen by this constructor).
        tokenizer: its open_clip tokenizer.
        classnames: class names, index == label.
        prompt: prompt configuration.
        truncate_text: run the text transformer only up to the longest end-of-text position, and the prompt prefix
            shared by all classes (start token + unified context) only once (same outputs). False runs all 77
            positions of every prompt, as the reference implementation does.
        generator: RNG for random context initialisation.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        prompt: PromptConfig,
        truncate_text: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        clip.requires_grad_(False)
        tower = text_tower(clip)
        self.prompt_learner = PromptLearner(
            tower.token_embedding,
            tokenizer,
            classnames,
            n_ctx=prompt.n_ctx,
            ctx_init=prompt.ctx_init,
            csc=prompt.csc,
            class_token_position=prompt.class_token_position,
            generator=generator,
        )
        self.text_encoder = TextEncoder(clip, truncate=truncate_text)
        self.image_encoder = clip.visual
        self.logit_scale = clip.logit_scale
        self.prompt = prompt

    def train(self, mode: bool = True) -> CoOpModel:
        """Set training mode for the prompt learner only: CLIP stays in eval mode (frozen BatchNorm/dropout)."""
        super().train(mode)
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    @property
    def classnames(self) -> list[str]:
        return self.prompt_learner.classnames

    def text_features(self, classes: slice | torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features ``(n, embed_dim)`` from the current context.

        Args:
            classes: encode only these classes, in this order: a range or a ``LongTensor`` of class indices (one
                worker's shard in class-sharded training); all ``n_cls`` by default. A subset is truncated at its own
                longest prompt (the same features).
        """
        pl = self.prompt_learner
        prompts = pl(classes)  # (n, seq, width)
        if isinstance(classes, torch.Tensor):
            classes = classes.to(pl.eot_idx.device)
        eot_idx = pl.eot_idx if classes is None else pl.eot_idx[classes]  # (n,)
        shared = self.shared_prefix if self.text_encoder.truncate else 0
        return F.normalize(self.text_encoder(prompts, eot_idx, shared_prefix=shared), dim=-1)

    @property
    def shared_prefix(self) -> int:
        """Leading prompt positions built from the same tensors for every class: start token + unified context."""
        pl = self.prompt_learner
        if pl.csc or pl.class_token_position == "front":
            return 1  # only the start-of-text token
        return 1 + (pl.n_ctx if pl.class_token_position == "end" else pl.n_ctx // 2)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``(b, embed_dim)`` from the frozen image encoder."""
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities ``(b, n_cls)`` of normalised features."""
        return self.logit_scale.exp() * image_features @ text_features.t().to(image_features.dtype)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, n_cls)`` for normalised image features."""
        return self.logits(image_features, self.text_features())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, n_cls)`` for a batch of preprocessed images."""
        return self.forward_features(self.encode_images(images))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters CoOp optimises: only the context."""
        return [self.prompt_learner.ctx]
