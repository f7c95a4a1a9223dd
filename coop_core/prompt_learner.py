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


UNTRUNCATED_LENGTH = 1024  # tokenize this far when counting, so open_clip's truncation at 77 cannot hide a long text


def _n_word_tokens(tokenizer: Callable, text: str) -> int:
    """Number of BPE tokens ``text`` becomes, without the start/end tokens (not truncated at the context length)."""
    try:
        ids = tokenizer([text], context_length=UNTRUNCATED_LENGTH)[0]
    except TypeError:  # a tokenizer without the argument: its own context length is the limit
        ids = tokenizer([text])[0]
    return int(ids.argmax()) - 1  # the end-of-text token has the largest id; position 0 is start-of-text


def normalise_ctx_init(ctx_init: str) -> str:
    """``ctx_init`` as the prompt learner uses it: underscores as spaces, single spaces."""
    return " ".join(ctx_init.replace("_", " ").split())


def _quoted(text: str, limit: int = 40) -> str:
    """``repr`` of ``text``, cut to about ``limit`` characters for one-line messages."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def check_prompt_fits(tokenizer: Callable, classnames: Sequence[str], n_ctx: int, ctx_init: str = "",
                      pad_ctx_init: bool = False) -> int:
    """Check that every class's prompt fits the text context; return the effective context length.

    A prompt is start + context + class-name tokens + "." + end. ``ctx_init`` (when given) sets the context length to
    its token count, unless ``pad_ctx_init`` keeps ``n_ctx`` (which must then hold its tokens). Cheap (tokenizer
    only), so the platform calls it before any worker starts.

    Raises:
        ValueError: ``ctx_init`` or a class name tokenizes to nothing, or the longest prompt overflows the context;
            the message names the class, the token counts and what to change.
    """
    seq_len = int(tokenizer(["x"]).shape[1])
    ctx_init = normalise_ctx_init(ctx_init)
    if ctx_init:
        n_words = _n_word_tokens(tokenizer, ctx_init)
        if n_words < 1:
            raise ValueError(f"ctx_init {_quoted(ctx_init)} tokenizes to no tokens; give words (e.g. 'a photo of "
                             "a') or '' for a random context")
        if pad_ctx_init and n_words > n_ctx:
            raise ValueError(f"ctx_init {_quoted(ctx_init)} is {n_words} tokens, more than n_ctx {n_ctx}: with "
                             "pad_ctx_init the words fill the last context slots; raise --n-ctx or shorten it")
        n_ctx = n_ctx if pad_ctx_init else n_words
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx}")
    names = [clean_classname(c) for c in classnames]
    lens = [_n_word_tokens(tokenizer, name) for name in names]
    for name, k in zip(names, lens):
        if k < 1:
            raise ValueError(f"class name {_quoted(name)} tokenizes to no tokens, so its prompt could not name the "
                             "class; give the class a readable name in the split file")
    longest = max(range(len(names)), key=lambda c: lens[c])
    room = seq_len - 3 - lens[longest]  # context tokens that still fit beside the longest class name
    if room < 1:
        raise ValueError(f"class name {_quoted(names[longest])} is {lens[longest]} tokens, too long for the text "
                         f"context of {seq_len} tokens with any context; shorten it to at most {seq_len - 4} tokens")
    if n_ctx > room:
        what = f"ctx_init {_quoted(ctx_init)} is {n_ctx} tokens" if ctx_init else f"n_ctx is {n_ctx}"
        flag = "a shorter --ctx-init" if ctx_init else "--n-ctx"
        raise ValueError(f"the prompt does not fit CLIP's {seq_len}-token text context: {what}, and class "
                         f"{_quoted(names[longest])} takes {lens[longest]} more + 3 (start, '.', end); use a "
                         f"context of at most {room} tokens ({flag})")
    return n_ctx


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
        pad_ctx_init: keep ``n_ctx`` when ``ctx_init`` is shorter: its words fill the last slots, the first start at
            zero (ProGrad's initialisation).

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
        pad_ctx_init: bool = False,
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

        ctx_init = normalise_ctx_init(ctx_init)
        n_ctx = check_prompt_fits(tokenizer, self.classnames, n_ctx, ctx_init, pad_ctx_init)
        if ctx_init:
            init_ids = tokenizer([ctx_init]).to(device)
            k = _n_word_tokens(tokenizer, ctx_init)
            ctx_vectors = torch.zeros(n_ctx, width, device=device)  # (n_ctx, width); k < n_ctx only when padded
            with torch.no_grad():
                ctx_vectors[n_ctx - k:] = token_embedding(init_ids)[0, 1 : 1 + k].float()  # (k, width)
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
        name_lens = [_n_word_tokens(tokenizer, name) for name in self.classnames]  # all fit (checked above)
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
