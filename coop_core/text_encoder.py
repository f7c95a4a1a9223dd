"""CLIP's text tower run on prompt embeddings instead of token ids.

open_clip's text path is batch-first: ``(batch, seq, width)`` all the way through, so no ``permute(1, 0, 2)``.

Truncation: the text transformer is causal and the text feature is read at the end-of-text (EOT) position, so nothing
after the longest EOT among the prompts can change any feature. We run the transformer on ``max(eot) + 1`` positions
instead of the full context length (77 for CLIP), with identical outputs.

Batch-first blocks: open_clip's ``ResidualAttentionBlock`` calls ``nn.MultiheadAttention(batch_first=True)``, which
turns the input sequence-first internally; its QKV projection then runs on a non-contiguous input as one small matmul
per position, and q/k/v are copied out and, in backward, zero-filled and summed back. For a plain block (no
cross-attention, no key/value bias, no dropout) we compute the very same operations batch-first instead: one QKV
matmul over all ``n * seq`` tokens, views for q/k/v, the same ``scaled_dot_product_attention`` kernel. Outputs are
identical; on CPU the text forward+backward spends its time in matmuls again (see ``bench/text_floor.py``).

Shared prefix: with a unified context and the class name at the end, every prompt starts with the same tokens
(start-of-text + the context), so under the causal mask their hidden states are the same in every prompt. Given
``shared_prefix=p``, those ``p`` positions go through the transformer once and the per-class remainders attend to
their keys and values (EuroSAT: 17 + 10 x 6 tokens instead of 10 x 23). Gradients are the same: the shared states feed
every class and autograd sums their contributions, exactly as the context's gradient sums over the per-class copies.

Segments (many prompt sets in one pass, ``coop_core.pack``): the shared prefix generalised to a tree. The prompts'
tokens are laid out flat, without padding, as *segments*: runs of consecutive positions whose hidden states are the
same wherever they occur (the start-of-text token, which every prompt of every prompt set shares; a unified
context's prefix, which its classes share; each prompt's own remainder). A segment attends to its ancestors' tokens
and causally to its own (:class:`Segments`), so each token's state is the one it has in its own prompt's full pass.
The linear layers run on the flat tokens only; attention runs per bucket of similar-length segments, padded to the
bucket's longest (padding masked out), as batched matmuls (faster on CPU than the fused kernel for short segments);
and the last block runs only the end-of-text tokens, the only ones read (with every token's keys and values). For the
32 configurations of ``bench/pack_step.py`` this is 2,949 token rows where padding every prompt to the longest gives
7,360.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


def text_tower(clip: nn.Module) -> nn.Module:
    """Return the module holding the text transformer: the model itself for ``CLIP``, ``.text`` for ``CustomTextCLIP``.

    Raises:
        ValueError: the text tower cannot carry CoOp prompts (Hugging Face text towers, non-causal towers, CoCa-style
            class-token pooling, or pooling other than at the end-of-text token).
    """
    tower = clip.text if hasattr(clip, "text") else clip
    if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
        raise ValueError(
            f"{type(tower).__name__} has no token_embedding/transformer: CoOp needs open_clip's built-in text "
            "transformer (Hugging Face text towers are not supported)"
        )
    if getattr(tower, "cls_emb", None) is not None:
        raise ValueError("text towers with an appended class token (CoCa) are not supported by CoOp")
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool != "argmax":
        raise ValueError(f"CoOp reads the text feature at the end-of-text token (pool type 'argmax'), got {pool!r}")
    if getattr(tower, "attn_mask", None) is None:
        raise ValueError("CoOp needs a causal text transformer (this tower has no causal attention mask)")
    return tower


def _plain_block(block: nn.Module) -> bool:
    """Whether ``block`` is open_clip's standard self-attention block, which :func:`_block_forward` reproduces."""
    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock
        and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn.in_proj_weight is not None  # packed QKV (same embedding dim for q, k, v)
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and attn.dropout == 0.0
    )


def _block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` for self-attention, batch-first throughout."""
    attn = block.attn
    n, seq, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (n, seq, 3 * width)
    q, k, v = qkv.view(n, seq, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (n, heads, seq, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))  # (n, heads, seq, hd)
    out = attn.out_proj(out.transpose(1, 2).reshape(n, seq, width))  # (n, seq, width)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _block_forward_shared(block: nn.Module, x: torch.Tensor, prefix: int, n: int, attn_mask: torch.Tensor
                          ) -> torch.Tensor:
    """:func:`_block_forward` on a flat token matrix: one shared prefix of ``prefix`` tokens, then ``n`` remainders.

    ``x`` is ``(prefix + n * rest, width)``; the remainders attend causally to the shared prefix and to themselves.
    """
    attn = block.attn
    width = x.shape[1]
    rest = (x.shape[0] - prefix) // n
    heads, hd = attn.num_heads, width // attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (tokens, 3 * width)
    qp, kp, vp = qkv[:prefix].view(1, prefix, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (1, heads, p, hd)
    qr, kr, vr = qkv[prefix:].view(n, rest, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (n, heads, r, hd)
    mask = attn_mask.to(qp.dtype)
    out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:prefix, :prefix])  # (1, h, p, hd)
    k = torch.cat([kp.expand(n, -1, -1, -1), kr], dim=2)  # (n, h, p + r, hd)
    v = torch.cat([vp.expand(n, -1, -1, -1), vr], dim=2)  # (n, h, p + r, hd)
    out_r = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask[prefix:prefix + rest, :prefix + rest])
    out = torch.cat([out_p.transpose(1, 2).reshape(prefix, width), out_r.transpose(1, 2).reshape(n * rest, width)])
    x = x + block.ls_1(attn.out_proj(out))  # (tokens, width)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@dataclass(frozen=True)
class SegmentBucket:
    """Segments of similar length, attended together (padded to the longest of them).

    q_index: ``(S, Lq)`` flat token index of each segment's own tokens, padded with 0.
    kv_index: ``(S, Lk)`` its ancestors' tokens (root first) and then its own, padded with 0.
    bias: ``(S, 1, Lq, Lk)`` additive attention mask: 0 where the query token may attend, -inf elsewhere (its
        ancestors, and its own tokens causally; never a padded key; a padded query row sees its first key only, so it
        stays finite: its output is dropped).
    """

    q_index: torch.Tensor
    kv_index: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class Segments:
    """A flat layout of prompts for :meth:`TextEncoder.forward_segments` (built by :func:`segments`).

    buckets: the segments grouped by length (attention pads within a bucket only). out_index: ``(T,)`` row of each
    flat token in the buckets' padded query rows, concatenated. eot: ``(n,)`` flat index of each prompt's
    end-of-text token, in prompt order. eot_kv_index ``(n, Lk)``, eot_bias ``(n, 1, 1, Lk)``: what each end-of-text
    token attends to (its prompt's tokens; padded keys masked), for the last block, which runs only those tokens.
    """

    buckets: tuple[SegmentBucket, ...]
    out_index: torch.Tensor
    eot: torch.Tensor
    eot_kv_index: torch.Tensor
    eot_bias: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.out_index.shape[0])


MIN_BUCKET = 8  # a length bucket with fewer segments joins the next longer one (fewer, larger attention calls)


def _length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Segment indices grouped by own length, up to a power of two (1, 2, 3-4, 5-8, 9-16, ...): attention pads each
    bucket to its longest segment, so a short segment never pays for a long one's length squared."""
    by_size: dict[int, list[int]] = {}
    for s, n in enumerate(lengths):
        by_size.setdefault((n - 1).bit_length(), []).append(s)
    buckets, pending = [], []
    for size in sorted(by_size):
        pending += by_size[size]
        if len(pending) >= MIN_BUCKET:
            buckets.append(pending)
            pending = []
    if pending:
        if buckets:
            buckets[-1] += pending
        else:
            buckets.append(pending)
    return buckets


def segments(parents: Sequence[int], lengths: Sequence[int], eot: Sequence[int],
             device: torch.device | str = "cpu") -> Segments:
    """The :class:`Segments` of a flat token layout.

    Segment ``s`` holds flat tokens ``[start_s, start_s + lengths[s])``, the segments laid out in order;
    ``parents[s]`` is the segment whose tokens precede it in every prompt it belongs to (-1 for none), listed
    before it. ``eot``: each prompt's end-of-text token, a flat index.

    Raises:
        ValueError: a parent listed after its child, or an empty segment.
    """
    if any(n < 1 for n in lengths):
        raise ValueError("every segment needs at least one token")
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    chains: list[list[int]] = []  # each segment's ancestors' flat tokens, root first
    for s, parent in enumerate(parents):
        if parent >= s:
            raise ValueError(f"segment {s}'s parent {parent} must come before it")
        chains.append([] if parent < 0 else
                      chains[parent] + list(range(starts[parent], starts[parent] + lengths[parent])))
    out_index = torch.empty(total, dtype=torch.long)
    buckets, row0 = [], 0
    for members in _length_buckets(lengths):
        lq = max(lengths[s] for s in members)
        lk = max(len(chains[s]) + lengths[s] for s in members)
        q_index = torch.zeros(len(members), lq, dtype=torch.long)
        kv_index = torch.zeros(len(members), lk, dtype=torch.long)
        bias = torch.full((len(members), 1, lq, lk), float("-inf"))
        causal = torch.zeros(lq, lq).masked_fill(torch.ones(lq, lq, dtype=torch.bool).triu(1), float("-inf"))
        for i, s in enumerate(members):
            n, start, a = lengths[s], starts[s], len(chains[s])
            own = torch.arange(start, start + n)
            q_index[i, :n] = own
            if a:
                kv_index[i, :a] = torch.tensor(chains[s])
            kv_index[i, a:a + n] = own
            bias[i, 0, :n, :a] = 0.0
            bias[i, 0, :n, a:a + n] = causal[:n, :n]
            bias[i, 0, n:, 0] = 0.0  # padded query rows: one visible key keeps them finite
            out_index[start:start + n] = row0 + i * lq + torch.arange(n)
        row0 += len(members) * lq
        buckets.append(SegmentBucket(q_index.to(device), kv_index.to(device), bias.to(device)))
    ending = {start + n - 1: s for s, (start, n) in enumerate(zip(starts, lengths))}
    if any(e not in ending for e in eot):
        raise ValueError("every end-of-text token must end its segment")
    prompts = [chains[ending[e]] + list(range(starts[ending[e]], e + 1)) for e in eot]
    lk = max(len(p) for p in prompts)
    eot_kv = torch.zeros(len(eot), lk, dtype=torch.long)
    eot_bias = torch.full((len(eot), 1, 1, lk), float("-inf"))
    for i, p in enumerate(prompts):
        eot_kv[i, :len(p)] = torch.tensor(p)
        eot_bias[i, 0, 0, :len(p)] = 0.0
    return Segments(tuple(buckets), out_index.to(device), torch.as_tensor(list(eot), dtype=torch.long).to(device),
                    eot_kv.to(device), eot_bias.to(device))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask)`` as its definition (batched matmuls and a softmax), with
    ``bias`` ``(S * heads, Lq, Lk)``: for many short segments this is faster on CPU than the fused kernel, which
    works in blocks sized for long sequences (the same values up to rounding)."""
    n_seg, heads, lq, hd = q.shape
    lk = k.shape[2]
    scores = torch.baddbmm(bias, q.reshape(n_seg * heads, lq, hd), k.reshape(n_seg * heads, lk, hd).transpose(1, 2),
                           alpha=hd ** -0.5)  # (S * heads, Lq, Lk)
    return torch.bmm(scores.softmax(-1), v.reshape(n_seg * heads, lk, hd)).view(n_seg, heads, lq, hd)


def _block_forward_segments(block: nn.Module, x: torch.Tensor, seg: Segments,
                            bias: dict[tuple[int, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """:func:`_block_forward` on flat tokens ``(T, width)`` laid out as ``seg`` (``bias``: each bucket's mask per
    dtype, filled on first use)."""
    attn = block.attn
    width = x.shape[1]
    heads, hd = attn.num_heads, width // attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (T, 3 * width)
    q, k, v = qkv.view(-1, 3, heads, hd).unbind(1)  # (T, heads, hd) each

    def rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (S, heads, L, hd)
        # index_select, not t[index]: its backward is index_add, many times faster than indexing's index_put
        return t.index_select(0, index.reshape(-1)).view(*index.shape, heads, hd).transpose(1, 2)

    outs = []
    for b, bucket in enumerate(seg.buckets):
        n_seg, lq = bucket.q_index.shape
        lk = bucket.kv_index.shape[1]
        if (b, q.dtype) not in bias:  # (S * heads, Lq, Lk), the mask repeated for each head
            bias[b, q.dtype] = bucket.bias.to(q.dtype).expand(n_seg, heads, lq, lk).reshape(n_seg * heads, lq, lk)
        out = _attention(rows(q, bucket.q_index), rows(k, bucket.kv_index), rows(v, bucket.kv_index),
                         bias[b, q.dtype])  # (S, heads, Lq, hd)
        outs.append(out.transpose(1, 2).reshape(-1, width))
    out = torch.cat(outs).index_select(0, seg.out_index)  # (T, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _last_block_at_eot(block: nn.Module, x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """The last block for the end-of-text tokens only (what the text feature reads): keys and values of every token,
    queries, attention, projection and MLP for those tokens alone; ``(n, width)``."""
    attn = block.attn
    width = x.shape[1]
    heads, hd = attn.num_heads, width // attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    h = block.ln_1(x)
    kv = F.linear(h, w[width:], None if b is None else b[width:])  # (T, 2 * width)
    x_eot = x.index_select(0, seg.eot)  # (n, width)
    q = F.linear(h.index_select(0, seg.eot), w[:width], None if b is None else b[:width])  # (n, width)
    k, v = kv.view(-1, 2, heads, hd).unbind(1)  # (T, heads, hd) each
    n, lk = seg.eot_kv_index.shape
    keys = k.index_select(0, seg.eot_kv_index.reshape(-1)).view(n, lk, heads, hd).transpose(1, 2)
    values = v.index_select(0, seg.eot_kv_index.reshape(-1)).view(n, lk, heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(n, 1, heads, hd).transpose(1, 2), keys, values,
                                         attn_mask=seg.eot_bias.to(q.dtype))  # (n, heads, 1, hd)
    x_eot = x_eot + block.ls_1(attn.out_proj(out.reshape(n, width)))
    return x_eot + block.ls_2(block.mlp(block.ln_2(x_eot)))


class TextEncoder(nn.Module):
    """Frozen CLIP text transformer applied to prompt embeddings.

    Args:
        clip: an open_clip ``CLIP`` or ``CustomTextCLIP``; its text modules are shared, not copied.
        truncate: run only up to the longest end-of-text position (identical outputs, less compute).
    """

    def __init__(self, clip: nn.Module, truncate: bool = True) -> None:
        super().__init__()
        tower = text_tower(clip)
        self.transformer = tower.transformer
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.truncate = truncate
        self._batch_first_blocks = getattr(self.transformer, "batch_first", False) and all(
            _plain_block(b) for b in getattr(self.transformer, "resblocks", ())
        )

    @property
    def segments_ok(self) -> bool:
        """Whether :meth:`forward_segments` can run this tower (open_clip's plain blocks, no gradient checkpointing)."""
        return self._batch_first_blocks and not self.transformer.grad_checkpointing

    def forward_segments(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """Encode prompts laid out flat as ``seg``: ``x`` is ``(T, width)``, each token's embedding plus its
        positional embedding, in the transformer's dtype. Returns unnormalised text features ``(n, embed_dim)``, one
        per end-of-text token of ``seg``.

        Raises:
            ValueError: the tower's blocks are not open_clip's plain ones (:attr:`segments_ok`).
        """
        if not self.segments_ok:
            raise ValueError("this text tower cannot run flat segments (custom blocks or gradient checkpointing)")
        bias: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = _block_forward_segments(block, x, seg, bias)
        return self._project(self.ln_final(_last_block_at_eot(last, x, seg)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)  # (n, embed_dim)
        return x @ self.text_projection  # (n, embed_dim)

    def forward(self, prompts: torch.Tensor, eot_idx: torch.Tensor, shared_prefix: int = 0) -> torch.Tensor:
        """Encode prompts.

        Args:
            prompts: token embeddings of full-length prompts, ``(n, context_length, width)``.
            eot_idx: end-of-text position of each prompt, ``(n,)``.
            shared_prefix: number of leading positions that hold the same embeddings in every prompt *by
                construction* (start token + unified context), computed once. Only ``prompts[0]`` of those positions
                is read, so gradients reach the prompts through row 0: pass it only when all rows come from the same
                tensors (never because values happen to be equal, e.g. a class-specific context initialised alike).

        Returns:
            Unnormalised text features ``(n, embed_dim)``.
        """
        seq = int(eot_idx.max()) + 1 if self.truncate else prompts.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = prompts[:, :seq].to(cast_dtype) + self.positional_embedding[:seq].to(cast_dtype)  # (n, seq, width)
        attn_mask = self.attn_mask[:seq, :seq]  # (seq, seq), causal
        n, _, width = x.shape
        rows = torch.arange(n, device=x.device)
        fast = self._batch_first_blocks and not self.transformer.grad_checkpointing
        if fast and n > 1 and 1 < shared_prefix <= int(eot_idx.min()):
            p = shared_prefix
            x = torch.cat([x[0, :p], x[:, p:].reshape(-1, width)])  # (p + n * (seq - p), width)
            for block in self.transformer.resblocks:
                x = _block_forward_shared(block, x, p, n, attn_mask)
            x = x[p:].view(n, seq - p, width)[rows, eot_idx - p]  # (n, width)
        else:
            if fast:
                for block in self.transformer.resblocks:
                    x = _block_forward(block, x, attn_mask)  # (n, seq, width)
            else:
                x = self.transformer(x, attn_mask=attn_mask)  # (n, seq, width)
            x = x[rows, eot_idx]  # (n, width)
        return self._project(self.ln_final(x))  # LayerNorm is per-token: after the EOT gather it is the same, cheaper
