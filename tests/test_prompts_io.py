"""Learned prompts on disk: the context and what it means travel together, and mismatches are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coop_core.config import PromptConfig
from coop_core.prompts_io import FORMAT_VERSION, PromptMeta, load_prompts, save_prompts

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ("Annual Crop Land", "Forest", "Sea or Lake")


def _meta(**prompt) -> PromptMeta:
    return PromptMeta("ViT-B-16", "openai", CLASSNAMES, PromptConfig(**({"n_ctx": 4} | prompt)),
                      extra={"dataset": "eurosat", "shots": "16"})


@pytest.mark.parametrize(
    ("prompt", "shape"),
    [
        ({"n_ctx": 4}, (4, 512)),
        ({"n_ctx": 4, "csc": True, "class_token_position": "middle"}, (3, 4, 512)),
        ({"ctx_init": "a photo of a", "class_token_position": "front"}, (4, 512)),
    ],
)
def test_round_trip_keeps_the_context_and_its_meaning(tmp_path, prompt, shape):
    ctx = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    meta = _meta(**prompt)
    path = save_prompts(tmp_path / "run" / "prompts.safetensors", ctx, meta)
    loaded, loaded_meta = load_prompts(path)
    assert torch.equal(loaded, ctx)
    assert loaded_meta == meta
    assert loaded_meta.classnames == CLASSNAMES and loaded_meta.prompt == meta.prompt
    sidecar = json.loads((tmp_path / "run" / "prompts.safetensors.json").read_text())
    assert sidecar["shape"] == list(shape) and json.loads(sidecar["classnames"]) == list(CLASSNAMES)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["prompts.safetensors", "prompts.safetensors.json"]


def test_low_precision_context_is_stored_as_fp32(tmp_path):
    ctx = torch.randn(4, 8).to(torch.bfloat16)
    loaded, _ = load_prompts(save_prompts(tmp_path / "p.safetensors", ctx, _meta()))
    assert loaded.dtype == torch.float32 and torch.equal(loaded, ctx.float())


@pytest.mark.parametrize(
    ("prompt", "shape"),
    [
        ({"n_ctx": 4}, (5, 512)),  # wrong n_ctx
        ({"n_ctx": 4}, (3, 4, 512)),  # class-specific context for unified metadata
        ({"n_ctx": 4, "csc": True}, (4, 512)),  # unified context for class-specific metadata
        ({"n_ctx": 4, "csc": True}, (2, 4, 512)),  # wrong number of classes
    ],
)
def test_saving_a_context_that_does_not_match_its_metadata_raises(tmp_path, prompt, shape):
    with pytest.raises(ValueError, match="does not match metadata"):
        save_prompts(tmp_path / "p.safetensors", torch.zeros(shape), _meta(**prompt))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_loading_a_file_of_another_format_version_raises(tmp_path):
    path = save_prompts(tmp_path / "p.safetensors", torch.zeros(4, 8), _meta())
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    save_file({"ctx": torch.zeros(4, 8)}, str(path), metadata=header | {"format_version": "999"})
    with pytest.raises(ValueError, match=f"unsupported prompt file format '999' \\(expected {FORMAT_VERSION}\\)"):
        load_prompts(path)
    save_file({"ctx": torch.zeros(4, 8)}, str(path))  # a plain tensor file without our header
    with pytest.raises(ValueError, match="unsupported prompt file format None"):
        load_prompts(path)


def test_overwriting_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "p.safetensors"
    save_prompts(path, torch.zeros(4, 8), _meta())
    save_prompts(path, torch.ones(4, 8), _meta())
    assert torch.equal(load_prompts(path)[0], torch.ones(4, 8))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_changed_file_fails_its_sha256_and_is_refused_with_one_line(tmp_path):
    from coop_core.prompts_io import PromptFileError

    path = save_prompts(tmp_path / "p.safetensors", torch.randn(4, 8), _meta())
    original = path.read_bytes()
    data = bytearray(original)
    data[-5] ^= 0x40  # one bit of one context value
    path.write_bytes(bytes(data))
    with pytest.raises(PromptFileError, match=r"fails its sha256 check: its context or metadata changed") as info:
        load_prompts(path)
    assert "\n" not in str(info.value)
    # A rewritten header (other class names) with the old digest is refused too.
    path.write_bytes(original)
    with safe_open(str(path), framework="pt") as f:
        header, ctx = f.metadata(), f.get_tensor("ctx")
    save_file({"ctx": ctx}, str(path), metadata=header | {"classnames": json.dumps(["a", "b", "c"])})
    with pytest.raises(PromptFileError, match="fails its sha256 check"):
        load_prompts(path)
    save_file({"ctx": ctx}, str(path), metadata={k: v for k, v in header.items() if k != "sha256"})
    with pytest.raises(PromptFileError, match="fails its sha256 check"):  # no digest at all
        load_prompts(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(PromptFileError, match="not a valid safetensors file"):
        load_prompts(path)


def test_prompts_are_refused_by_a_model_of_other_classes_or_shape(tmp_path):
    from coop_core.prompts_io import PromptFileError, check_prompts_fit

    ctx, meta = load_prompts(save_prompts(tmp_path / "p.safetensors", torch.randn(4, 8), _meta()))
    check_prompts_fit(ctx, meta, ["Annual_Crop_Land", "Forest", "Sea or Lake"], (4, 8))  # names as the model cleans
    with pytest.raises(PromptFileError, match=r"same classes in another order \(labels would be swapped\)"):
        check_prompts_fit(ctx, meta, ["Forest", "Annual Crop Land", "Sea or Lake"], (4, 8))
    with pytest.raises(PromptFileError, match=r"3 classes vs the model's 2; only in the file: \['Sea or Lake'\]"):
        check_prompts_fit(ctx, meta, ["Annual Crop Land", "Forest"], (4, 8))
    with pytest.raises(PromptFileError, match=r"context \(4, 8\) does not fit the model's \(4, 16\)"):
        check_prompts_fit(ctx, meta, CLASSNAMES, (4, 16))
