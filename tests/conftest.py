"""Shared fixtures: tiny open_clip models from JSON configs, the real-data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The shared real-data root: $COOP_DATA_ROOT, else ../shared/data beside the repository."""
    return Path(os.environ.get("COOP_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "eurosat" / "2750").is_dir():
        pytest.skip(f"real EuroSAT data not found under {root} (set COOP_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def tiny_vit_config() -> str:
    return str(FIXTURES / "tiny-vit.json")


@pytest.fixture(scope="session")
def tiny_rn_config() -> str:
    return str(FIXTURES / "tiny-rn.json")


@pytest.fixture(scope="session")
def tiny_clip(tiny_vit_config):
    """A tiny ViT CLIP with deterministic random weights (frozen)."""
    from coop_core.backbone import load_clip

    return load_clip(tiny_vit_config, "none")
