"""Shared fixtures: tiny open_clip models from JSON configs, the real-data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from real_data import data_root, missing

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "eurosat" / "2750").is_dir():
        missing(f"real EuroSAT data not found under {root} (set COOP_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def tiny_vit_config() -> str:
    return str(FIXTURES / "tiny-vit.json")


@pytest.fixture(scope="session")
def tiny_rn_config() -> str:
    return str(FIXTURES / "tiny-rn.json")


@pytest.fixture(scope="session")
def aligned_vit_checkpoint(tiny_vit_config, shared_data, tmp_path_factory) -> str:
    """The tiny ViT with its image projection ridge-aligned to EuroSAT's zero-shot prompts (tests/aligned.py): a
    checkpoint path for ``--pretrained``, zero-shot well above chance on real EuroSAT."""
    from aligned import aligned_tiny_checkpoint

    return str(aligned_tiny_checkpoint(tiny_vit_config, shared_data, tmp_path_factory.mktemp("aligned") / "vit.pt"))


@pytest.fixture(scope="session")
def tiny_clip(tiny_vit_config):
    """A tiny ViT CLIP with deterministic random weights (frozen)."""
    from coop_core.backbone import load_clip

    return load_clip(tiny_vit_config, "none")


def _digits_checkpoint_cache() -> Path | None:
    """Where the digits CLIP checkpoint is kept between runs (``.cache/`` is git-ignored); None if not writable."""
    path = REPO / ".cache" / "tests"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


@pytest.fixture(scope="session")
def digits_world(tmp_path_factory):
    """A tiny CLIP contrastively pretrained on scikit-learn's real handwritten digits, and a DatasetSplits of PNG
    files for CoOp (see tests/digits.py). Pretraining takes ~15 s on one core and is cached on disk by content."""
    pytest.importorskip("sklearn")
    import digits

    return digits.build_world(tmp_path_factory.mktemp("digits"), _digits_checkpoint_cache())


@pytest.fixture(scope="session")
def digits_clip(digits_world):
    """The digits CLIP loaded through the real loader: model-config JSON + local checkpoint."""
    from coop_core.backbone import load_clip

    return load_clip(str(digits_world.config_path), str(digits_world.checkpoint))


@pytest.fixture
def torch_single_thread():
    """Run a test's torch ops on one thread: on tiny tensors threads only add overhead, and on shared, busy CI cores
    a second OpenMP thread waiting for a core makes every op tens of times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
