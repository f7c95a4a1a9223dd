"""Learned prompts on disk: the context tensor as safetensors, with the metadata needed to use it again.

The metadata (backbone, weights, class names, n_ctx, class-token position, CSC, ctx_init) is stored in the
safetensors header as strings, so the file alone tells what it is; a JSON copy goes next to it for humans.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coop_core.config import PromptConfig

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class PromptMeta:
    """What a saved context means."""

    backbone: str
    pretrained: str
    classnames: tuple[str, ...]
    prompt: PromptConfig
    extra: dict[str, str] = field(default_factory=dict)

    def to_header(self) -> dict[str, str]:
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "classnames": json.dumps(list(self.classnames)),
            "n_ctx": str(self.prompt.n_ctx),
            "ctx_init": self.prompt.ctx_init,
            "csc": str(self.prompt.csc).lower(),
            "class_token_position": self.prompt.class_token_position,
            "extra": json.dumps(self.extra, sort_keys=True),
        }

    @classmethod
    def from_header(cls, h: dict[str, str]) -> PromptMeta:
        if h.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported prompt file format {h.get('format_version')!r} (expected {FORMAT_VERSION})")
        prompt = PromptConfig(n_ctx=int(h["n_ctx"]), ctx_init=h["ctx_init"], csc=h["csc"] == "true",
                              class_token_position=h["class_token_position"])
        return cls(h["backbone"], h["pretrained"], tuple(json.loads(h["classnames"])), prompt,
                   json.loads(h.get("extra", "{}")))


def save_prompts(path: str | Path, ctx: torch.Tensor, meta: PromptMeta) -> Path:
    """Write the context and its metadata atomically to ``path`` (``.safetensors``) and ``path`` + ``.json``."""
    path = Path(path)
    expected = (len(meta.classnames), meta.prompt.n_ctx) if meta.prompt.csc else (meta.prompt.n_ctx,)
    if tuple(ctx.shape[:-1]) != expected:
        raise ValueError(f"context shape {tuple(ctx.shape)} does not match metadata (expected {expected} + width)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"ctx": ctx.detach().float().contiguous().cpu()}, tmp, metadata=meta.to_header())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    json_path = path.with_suffix(path.suffix + ".json")
    json_path.write_text(json.dumps(meta.to_header() | {"shape": list(ctx.shape)}, indent=2, sort_keys=True))
    return path


def load_prompts(path: str | Path) -> tuple[torch.Tensor, PromptMeta]:
    """Read a context and its metadata written by :func:`save_prompts`."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        ctx = f.get_tensor("ctx")
    return ctx, PromptMeta.from_header(header)
