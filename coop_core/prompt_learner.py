"""CoOp's learnable prompt: context vectors spliced around the class-name token embeddings.

A prompt is ``[SOS] + context + class-name tokens + "." + [EOS]``, padded to the text context length. With the class
token at the ``middle`` the context is split ``n_ctx // 2`` before and the rest after the name; at the ``front`` the
name comes first. The three positions are one gather with a precomputed per-class index, so the forward pass has no
per-class Python loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from coop_core.config import CLASS_TOKEN_POSITIONS

logger = logging.getLogger(__name__)

CTX_INIT_STD = 0.02  # CoOp initialises random context from N(0, 0.02^2)


def clean_classname(name: str) -> str:
    """Class names as CoOp writes them into prompts: underscores become spaces."""
    return name.replace("_", " ").strip()


def _n_word_tokens(tokenizer: Callable, text: str) -> int:
    """Number of BPE tokens ``text`` becomes, without the start/end tokens."""
    ids = tokenizer([text])[0]
    return int(ids.argmax()) - 1  # the end-of-text token has the largest id; position 0 is start-of-text


def position_index(name_lens: Sequence[int], n_ctx: int, seq_len: int, position: str) -> torch.Tensor:
    """Gather index turning end-position prompts into ``position`` prompts.

    The source sequence is ``[SOS, ctx_1..ctx_n, name_1..name_k, ".", EOS, pad...]``. Returns ``(n_cls, seq_len)``
    indices into it such that ``out[c, t] = src[c, index[c, t]]``.
    """
    if position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {position!r}")
    rows = []
    for k in name_lens:
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + k))
        rest = list(range(1 + n_ctx + k, seq_len))
        if position == "end":
            order = [0] + ctx + name + rest
        elif position == "front":
            order = [0] + name + ctx + rest
        else:
            half = n_ctx // 2
            order = [0] + ctx[:half] + name + ctx[half:] + rest
        rows.append(order)
    return torch.tensor(rows, dtype=torch.long)  # (n_cls, seq_len)


class PromptLearner(nn.Module):
    """Learnable CoOp context for a fixed set of class names.

    Args:
        token_embedding: CLIP's (frozen) token embedding, used to embed the fixed tokens and ``ctx_init`` words.
        tokenizer: open_clip tokenizer of the same model.
        classnames: readable class names, index == label.
        n_ctx: number of context vectors (replaced by the word count of ``ctx_init`` when that is given).
        ctx_init: initialise the context from these words' token embeddings; "" for random N(0, 0.02^2).
        csc: one context per class ``(n_cls, n_ctx, width)`` instead of a shared ``(n_ctx, width)``.
        class_token_position: "end", "middle" or "front".
        generator: RNG for the random initialisation (deterministic runs pass a seeded one).

    Only ``ctx`` is a parameter; the fixed token embeddings are non-persistent buffers, so ``state_dict()`` is just
    ``{"ctx": ...}``.
    """

    def __init__(
        self,
        token_embedding: nn.Embedding,
        tokenizer: Callable,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str = "",
        csc: bool = False,
        class_token_position: str = "end",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("classnames must not be empty")
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {class_token_position!r}"
            )
        self.classnames = [clean_classname(c) for c in classnames]
        self.class_token_position = class_token_position
        self.csc = csc
        n_cls = len(self.classnames)
        width = token_embedding.weight.shape[1]
        device = token_embedding.weight.device

        ctx_init = " ".join(ctx_init.replace("_", " ").split())
        if ctx_init:
            init_ids = tokenizer([ctx_init]).to(device)
            n_ctx = _n_word_tokens(tokenizer, ctx_init)
            with torch.no_grad():
                ctx_vectors = token_embedding(init_ids)[0, 1 : 1 + n_ctx].float().clone()  # (n_ctx, width)
            if csc:
                ctx_vectors = ctx_vectors.unsqueeze(0).repeat(n_cls, 1, 1)  # (n_cls, n_ctx, width)
        else:
            shape = (n_cls, n_ctx, width) if csc else (n_ctx, width)
            ctx_vectors = torch.empty(shape).normal_(0.0, CTX_INIT_STD, generator=generator).to(device)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copy whatever the model's precision

        placeholder = " ".join(["X"] * n_ctx)
        tokens = tokenizer([f"{placeholder} {name}." for name in self.classnames]).to(device)  # (n_cls, seq)
        seq_len = tokens.shape[1]
        name_lens = [_n_word_tokens(tokenizer, name) for name in self.classnames]
        longest = max(range(n_cls), key=lambda c: name_lens[c])
        if n_ctx + name_lens[longest] + 3 > seq_len:  # SOS + context + name + "." + EOS
            raise ValueError(
                f"prompt for class {self.classnames[longest]!r} needs {n_ctx + name_lens[longest] + 3} tokens, "
                "more than "
                f"the text context length {seq_len}; use fewer context tokens"
            )
        eot_idx = tokens.argmax(dim=-1)  # (n_cls,)
        with torch.no_grad():
            embedding = token_embedding(tokens)  # (n_cls, seq, width)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # (n_cls, 1, width)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # (n_cls, *, width)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # (n_cls, seq)
        self.register_buffer("eot_idx", eot_idx, persistent=False)  # (n_cls,)
        # (n_cls, seq), expanded over the width only when used: stored expanded it was n_cls * seq * width int64s,
        # 315 MB at ImageNet's 1000 classes with ViT-B/16, more than the prompts it rearranges.
        index = position_index(name_lens, n_ctx, seq_len, class_token_position).to(device)
        self.register_buffer("gather_index", index, persistent=False)
        self.name_lens = name_lens
        logger.debug(
            "prompt learner: %d classes, n_ctx=%d, csc=%s, position=%s", n_cls, n_ctx, csc, class_token_position
        )

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def forward(self, classes: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings ``(n, seq, width)`` for the text encoder.

        Args:
            classes: build only these classes' prompts, in this order: a range, or a ``LongTensor`` of class indices
                (a worker of a class-sharded run encodes its own classes, ``coop_core.distributed.class_shards``,
                which need not be contiguous); all ``n_cls`` by default.
        """
        if classes is None:
            classes = slice(None)
        elif isinstance(classes, torch.Tensor):
            classes = classes.to(self.token_prefix.device)
        prefix = self.token_prefix[classes]  # (n, 1, width)
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)  # (n, n_ctx, width)
        else:
            ctx = ctx[classes]  # (n, n_ctx, width): the gradient reaches only these classes' rows
        ctx = ctx.to(prefix.dtype)
        prompts = torch.cat([prefix, ctx, self.token_suffix[classes]], dim=1)  # (n, seq, width), class name at the end
        if self.class_token_position == "end":
            return prompts
        index = self.gather_index[classes].unsqueeze(-1).expand(-1, -1, prompts.shape[-1])  # (n, seq, width)
        return torch.gather(prompts, 1, index)  # (n, seq, width)
