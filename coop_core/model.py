"""CoOp classifier: a frozen CLIP whose class prompts carry learned context."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coop_core.config import PromptConfig
from coop_core.prompt_learner import PromptLearner
from coop_core.text_encoder import TextEncoder, text_tower


class CoOpModel(nn.Module):
    conditional = False  # the class text features depend on the image (CoCoOp); CoOp's are one matrix per step

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
            pad_ctx_init=prompt.pad_ctx_init,
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

    def learned_state(self) -> dict[str, torch.Tensor]:
        """What training learned besides the context (CoCoOp's meta-net), detached copies on the CPU; {} for CoOp."""
        return {}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`learned_state` (nothing for CoOp).

        Raises:
            ValueError: ``state`` holds tensors this model does not learn.
        """
        if state:
            raise ValueError(f"{type(self).__name__} learns only its context; got other tensors {sorted(state)}")


def _init_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """``nn.Linear``'s default initialisation (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias), seeded."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=generator))
        layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=generator))


def image_embed_dim(clip: nn.Module) -> int:
    """Width of CLIP's (normalised) image features: the joint embedding, the text projection's output."""
    projection = text_tower(clip).text_projection
    if isinstance(projection, nn.Linear):
        return projection.out_features
    if projection is None:
        return text_tower(clip).ln_final.weight.shape[0]
    return projection.shape[1]


class CoCoOpModel(CoOpModel):
    """CoCoOp (Zhou et al., CVPR'22): CoOp's unified context shifted, for each image, by a meta-net of its feature.

    ``ctx_i = ctx + meta_net(f_i)`` for the normalised image feature ``f_i``; image ``i``'s logits are its scaled
    cosines to the text features of *its own* prompts ``[SOS, ctx_i, class, ".", EOS]``, so the text encoder runs for
    every image x class pair. The meta-net is ``Linear(d, d // ratio) -> ReLU -> Linear(d // ratio, width)`` as in the
    reference's ``trainers/cocoop.py``, initialised as ``nn.Linear`` initialises (from ``generator``).

    Fast where it counts: the images' prompts go through the text encoder together, truncated at the longest
    end-of-text token, in chunks of at most ``max_prompts`` prompts; under ``no_grad`` (evaluation) each chunk's
    activations are freed before the next, so memory stays bounded whatever the number of images. Training keeps the
    graph of its batch (the reference's recipe trains one image per step).

    Args:
        meta_net_ratio: the bottleneck ratio (16 in the reference).
        max_prompts: most prompts per text-encoder call.
        (the others as :class:`CoOpModel`; the prompt must be a unified context with the class name at the end)
    """

    conditional = True

    def __init__(self, clip: nn.Module, tokenizer: Callable, classnames: Sequence[str], prompt: PromptConfig,
                 meta_net_ratio: int = 16, truncate_text: bool = True, generator: torch.Generator | None = None,
                 max_prompts: int = 4096) -> None:
        if prompt.csc or prompt.class_token_position != "end":
            raise ValueError("CoCoOp needs a unified context with the class name at the end (csc false, "
                             f"class_token_position 'end'), got csc {prompt.csc}, {prompt.class_token_position!r}")
        super().__init__(clip, tokenizer, classnames, prompt, truncate_text=truncate_text, generator=generator)
        vis_dim = image_embed_dim(clip)
        width = self.prompt_learner.ctx.shape[-1]
        hidden = vis_dim // meta_net_ratio
        if hidden < 1:
            raise ValueError(f"meta_net_ratio {meta_net_ratio} leaves no hidden unit for image features of width "
                             f"{vis_dim}; use a ratio of at most {vis_dim}")
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width)),
        ])).to(self.prompt_learner.ctx.device)
        _init_linear(self.meta_net.linear1, generator)
        _init_linear(self.meta_net.linear2, generator)
        self.meta_net_ratio = meta_net_ratio
        self.max_prompts = max_prompts

    def conditional_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features ``(b, n_cls, embed_dim)``: image ``i``'s own prompts for every class."""
        pl = self.prompt_learner
        b, n = image_features.shape[0], pl.n_cls
        bias = self.meta_net(image_features.to(self.meta_net.linear1.weight.dtype))  # (b, width)
        ctx = pl.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (b, n_ctx, width)
        per_chunk = max(1, self.max_prompts // n)  # images per text-encoder call
        out = []
        for start in range(0, b, per_chunk):
            c = ctx[start:start + per_chunk]  # (m, n_ctx, width)
            m = c.shape[0]
            prompts = torch.cat([
                pl.token_prefix.unsqueeze(0).expand(m, -1, -1, -1),  # (m, n_cls, 1, width)
                c.to(pl.token_prefix.dtype).unsqueeze(1).expand(-1, n, -1, -1),  # (m, n_cls, n_ctx, width)
                pl.token_suffix.unsqueeze(0).expand(m, -1, -1, -1),  # (m, n_cls, *, width)
            ], dim=2).flatten(0, 1)  # (m * n_cls, seq, width)
            text = self.text_encoder(prompts, pl.eot_idx.repeat(m))  # (m * n_cls, embed_dim)
            out.append(F.normalize(text, dim=-1).view(m, n, -1))
        return torch.cat(out)  # (b, n_cls, embed_dim)

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, n_cls)`` for normalised image features, each against its own conditioned prompts."""
        text = self.conditional_text_features(image_features)  # (b, n_cls, d)
        return self.logit_scale.exp() * torch.einsum("bd,bcd->bc", image_features, text.to(image_features.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The context and the meta-net (CoCoOp optimises the whole prompt learner)."""
        return [self.prompt_learner.ctx, *self.meta_net.parameters()]

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {f"meta_net.{k}": v.detach().cpu().clone() for k, v in self.meta_net.state_dict().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k.removeprefix("meta_net."): v for k, v in state.items() if k.startswith("meta_net.")}
        if len(own) != len(state) or set(own) != set(self.meta_net.state_dict()):
            raise ValueError(f"a CoCoOp meta-net state needs {sorted(self.learned_state())}, got {sorted(state)}")
        self.meta_net.load_state_dict(own)
