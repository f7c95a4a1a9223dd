"""The real-data guard itself: a missing data root skips a developer's test but fails it in CI."""

from __future__ import annotations

import pytest
from real_data import missing


def _outcome() -> type[BaseException] | None:
    """What ``missing`` raises, caught here (a skip raised into the test would skip this test itself)."""
    try:
        missing("real EuroSAT data not found")
    except BaseException as err:  # pytest's Failed and Skipped derive from BaseException
        return type(err)
    return None


def test_a_missing_data_root_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert _outcome() is pytest.fail.Exception
    monkeypatch.delenv("CI")
    assert _outcome() is pytest.skip.Exception
