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
