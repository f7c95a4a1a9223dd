"""Learned prompts on disk: the context tensor as safetensors, with the metadata needed to use it again.

The metadata (backbone, weights, class names, n_ctx, class-token position, CSC, ctx_init) is stored in the
safetensors header as strings, so the file alone tells what it is; a JSON copy goes next to it for humans.

Integrity: the header also holds ``sha256``, a digest of the tensor's bytes, its shape and every other header field.
:func:`load_prompts` recomputes it and refuses a file whose context or metadata changed since it was written
(corruption or tampering) with one line, :class:`PromptFileError`. Safetensors holds tensors and strings only, so
loading never unpickles anything. :func:`check_prompts_fit` refuses a context whose class names or shape do not
match the model it is loaded into.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coop_core.atomic import atomic_path, atomic_write_text
from coop_core.config import MethodConfig, PromptConfig
from coop_core.prompt_learner import clean_classname

FORMAT_VERSION = "2"  # 2: the header carries the sha256 digest (format 1 files have none and are refused)
DIGEST_KEY = "sha256"


class PromptFileError(ValueError):
    """A prompt file that is not ours, was changed after it was written, or does not fit a model. One line."""


def prompt_digest(ctx: torch.Tensor, header: dict[str, str], learned: Mapping[str, torch.Tensor] | None = None
                  ) -> str:
    """sha256 over the header fields (except the digest itself, in sorted order), the shape and the fp32 bytes, then
    each other learned tensor (CoCoOp's meta-net: name, shape, bytes, in name order; none for CoOp)."""
    h = hashlib.sha256()
    fields = {k: v for k, v in header.items() if k != DIGEST_KEY}
    h.update(json.dumps(fields, sort_keys=True).encode())
    for name, t in (("ctx", ctx), *sorted((learned or {}).items())):
        if name != "ctx":
            h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PromptMeta:
    """What a saved context means."""

    backbone: str
    pretrained: str
    classnames: tuple[str, ...]
    prompt: PromptConfig
    extra: dict[str, str] = field(default_factory=dict)
    method: MethodConfig = field(default_factory=MethodConfig)
    # What the method learned besides the context (CoCoOp's meta-net weights), read from the same file.
    learned: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False, repr=False)

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
            "method": json.dumps(dataclasses.asdict(self.method), sort_keys=True),
            "pad_ctx_init": str(self.prompt.pad_ctx_init).lower(),
        }

    @classmethod
    def from_header(cls, h: dict[str, str], learned: Mapping[str, torch.Tensor] | None = None) -> PromptMeta:
        if h.get("format_version") != FORMAT_VERSION:
            raise PromptFileError(f"unsupported prompt file format {h.get('format_version')!r} (expected "
                                  f"{FORMAT_VERSION}); save it again with coop_core.save_prompts")
        try:
            prompt = PromptConfig(n_ctx=int(h["n_ctx"]), ctx_init=h["ctx_init"], csc=h["csc"] == "true",
                                  class_token_position=h["class_token_position"],
                                  pad_ctx_init=h.get("pad_ctx_init") == "true")
            method = MethodConfig(**json.loads(h["method"])) if "method" in h else MethodConfig()  # older files: CoOp
            return cls(h["backbone"], h["pretrained"], tuple(json.loads(h["classnames"])), prompt,
                       json.loads(h.get("extra", "{}")), method, dict(learned or {}))
        except (KeyError, ValueError, TypeError) as err:
            raise PromptFileError(f"prompt file header is incomplete or invalid ({type(err).__name__}: {err})"
                                  ) from None

    def expected_shape(self) -> tuple[int, ...]:
        """The context's shape without the width: ``(n_cls, n_ctx)`` for CSC, else ``(n_ctx,)``."""
        return (len(self.classnames), self.prompt.n_ctx) if self.prompt.csc else (self.prompt.n_ctx,)


def save_prompts(path: str | Path, ctx: torch.Tensor, meta: PromptMeta) -> Path:
    """Write the context, what else the method learned (``meta.learned``) and the metadata atomically to ``path``
    (``.safetensors``) and ``path`` + ``.json``."""
    path = Path(path)
    expected = meta.expected_shape()
    if tuple(ctx.shape[:-1]) != expected:
        raise ValueError(f"context shape {tuple(ctx.shape)} does not match metadata (expected {expected} + width)")
    ctx = ctx.detach().float().contiguous().cpu()
    learned = {k: v.detach().float().contiguous().cpu() for k, v in meta.learned.items()}
    if "ctx" in learned:
        raise ValueError("meta.learned must not hold 'ctx' (the context is its own argument)")
    header = meta.to_header()
    header[DIGEST_KEY] = prompt_digest(ctx, header, learned)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"ctx": ctx, **learned}, str(tmp), metadata=header)
    json_path = path.with_suffix(path.suffix + ".json")
    atomic_write_text(json_path, json.dumps(header | {"shape": list(ctx.shape)}, indent=2, sort_keys=True))
    return path


def load_prompts(path: str | Path) -> tuple[torch.Tensor, PromptMeta]:
    """Read and verify a context and its metadata written by :func:`save_prompts`.

    Raises:
        PromptFileError: not a safetensors prompt file, an unsupported format, or a digest that does not match (the
            file was changed after it was written).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "ctx" not in f.keys():
                raise PromptFileError(f"{path} holds no context tensor 'ctx': not a CoOp prompt file")
            ctx = f.get_tensor("ctx")
            learned = {k: f.get_tensor(k) for k in f.keys() if k != "ctx"}
    except PromptFileError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged headers and data
        raise PromptFileError(f"cannot read prompt file {path}: not a valid safetensors file ({err})") from None
    meta = PromptMeta.from_header(header, learned)
    if header.get(DIGEST_KEY) != prompt_digest(ctx, header, learned):
        raise PromptFileError(f"prompt file {path} fails its sha256 check: its context or metadata changed after it "
                              "was written (corrupted or tampered with); refusing it, use the original file")
    if tuple(ctx.shape[:-1]) != meta.expected_shape():
        raise PromptFileError(f"prompt file {path}: context {tuple(ctx.shape)} does not match its own metadata "
                              f"({meta.expected_shape()} + width)")
    return ctx, meta


def verified_digest(path: str | Path) -> str:
    """The sha256 of a prompt file, after :func:`load_prompts` has verified it (what a registry records)."""
    ctx, meta = load_prompts(path)
    return prompt_digest(ctx, meta.to_header(), meta.learned)


def check_prompts_fit(ctx: torch.Tensor, meta: PromptMeta, classnames: Sequence[str], ctx_shape: Sequence[int]
                      ) -> None:
    """Refuse prompts for another model: other class names (or order), or a context shape the model cannot take.

    Args:
        ctx: the loaded context.
        meta: its metadata.
        classnames: the class names of the model it is loaded into, index == label.
        ctx_shape: the shape of that model's context parameter.

    Raises:
        PromptFileError: what differs, in one line.
    """
    ours, theirs = [clean_classname(c) for c in meta.classnames], [clean_classname(c) for c in classnames]
    if ours != theirs:
        if sorted(ours) == sorted(theirs):
            detail = "the same classes in another order (labels would be swapped)"
        else:
            extra, missing = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            detail = f"{len(ours)} classes vs the model's {len(theirs)}; only in the file: {extra[:3]}, only in the " \
                     f"model: {missing[:3]}"
        raise PromptFileError(f"the prompts were learned for other class names: {detail}; load them into a model of "
                              "the classes they were trained on")
    if tuple(ctx.shape) != tuple(ctx_shape):
        raise PromptFileError(f"the prompt context {tuple(ctx.shape)} does not fit the model's {tuple(ctx_shape)} "
                              "(another n_ctx, CSC setting or backbone width); build the model from the file's "
                              "metadata")
