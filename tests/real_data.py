"""The shared real-data root (``../shared/data``, or ``$COOP_DATA_ROOT``), and what a test does when it is missing:
skip on a developer's machine, fail in CI (``$CI`` set), where a missing data root must not pass as a green run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The shared real-data root: $COOP_DATA_ROOT, else ../shared/data beside the repository."""
    return Path(os.environ.get("COOP_DATA_ROOT", REPO.parent / "shared" / "data"))


def missing(message: str) -> NoReturn:
    """Skip the test for want of real data; in CI, fail it instead (CI must run the real-data tests)."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run the real-data tests: provide the data root (see ../shared/data/README.md)",
                    pytrace=False)
    pytest.skip(message)
