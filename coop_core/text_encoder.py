"""CLIP's text tower run on prompt embeddings instead of token ids.

open_clip's text path is batch-first: ``(batch, seq, width)`` all the way through, so no ``permute(1, 0, 2)``.

Truncation: the text transformer is causal and the text feature is read at the end-of-text (EOT) position, so nothing
after the longest EOT among the prompts can change any feature. We run the transformer on ``max(eot) + 1`` positions
instead of the full context length (77 for CLIP), with identical outputs.
"""

from __future__ import annotations

import torch
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

    def forward(self, prompts: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
        """Encode prompts.

        Args:
            prompts: token embeddings of full-length prompts, ``(n, context_length, width)``.
            eot_idx: end-of-text position of each prompt, ``(n,)``.

        Returns:
            Unnormalised text features ``(n, embed_dim)``.
        """
        seq = int(eot_idx.max()) + 1 if self.truncate else prompts.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = prompts[:, :seq].to(cast_dtype) + self.positional_embedding[:seq].to(cast_dtype)  # (n, seq, width)
        x = self.transformer(x, attn_mask=self.attn_mask[:seq, :seq])  # (n, seq, width)
        x = x[torch.arange(x.shape[0], device=x.device), eot_idx]  # (n, width)
        x = self.ln_final(x)  # LayerNorm is per-token: applying it after the EOT gather is the same, and cheaper
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)  # (n, embed_dim)
        return x @ self.text_projection  # (n, embed_dim)
