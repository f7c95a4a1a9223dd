"""transfer_context: a unified context passes through, a class-specific one is re-indexed by class name or refused."""

from __future__ import annotations

import pytest
import torch

from coop_core.transfer import PromptTransferError, transfer_context

SOURCE = ["tench", "goldfish", "great_white_shark", "Tiger Shark", "hammerhead"]


def csc_context() -> torch.Tensor:
    """Row i is filled with the value i, so the picked rows are readable from the values."""
    return torch.arange(len(SOURCE), dtype=torch.float32).view(-1, 1, 1).expand(-1, 4, 3).clone()  # (5, 4, 3)


def test_unified_context_transfers_unchanged_to_any_classes():
    ctx = torch.randn(4, 3)
    out = transfer_context(ctx, SOURCE, False, ["cat", "dog"])
    assert out is ctx


def test_csc_subset_picks_the_target_classes_rows_in_target_order():
    out = transfer_context(csc_context(), SOURCE, True, ["hammerhead", "tench", "goldfish"])
    assert out.shape == (3, 4, 3)
    assert out[:, 0, 0].tolist() == [4.0, 0.0, 1.0]
    assert torch.equal(out[0], csc_context()[4])


def test_csc_match_ignores_case_and_underscores():
    out = transfer_context(csc_context(), SOURCE, True, ["Great White Shark", "tiger_shark", "TENCH"])
    assert out[:, 0, 0].tolist() == [2.0, 3.0, 0.0]


def test_duplicate_source_names_are_matched_in_order(caplog):
    source = ["missile", "cat", "missile"]
    ctx = torch.arange(3, dtype=torch.float32).view(3, 1, 1)
    assert transfer_context(ctx, source, True, ["missile"])[:, 0, 0].tolist() == [0.0]
    assert transfer_context(ctx, source, True, ["missile", "cat", "missile"])[:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert "shared by source rows [0, 2]" in caplog.text


def test_csc_refuses_classes_it_has_no_vector_for_in_one_line():
    with pytest.raises(PromptTransferError) as err:
        transfer_context(csc_context(), SOURCE, True, ["tench", "cat", "dog", "owl", "eel"])
    message = str(err.value)
    assert "\n" not in message
    assert "no vector for 4 of the 5 target classes (first: 'cat', 'dog', 'owl')" in message
    assert "train a unified context (no --csc) to evaluate on new classes" in message
    assert isinstance(err.value, ValueError)  # callers that catch ValueError keep working


def test_context_shapes_must_fit_the_flag():
    with pytest.raises(ValueError, match="class-specific context is \\(n_cls=5"):
        transfer_context(torch.zeros(4, 3), SOURCE, True, ["tench"])
    with pytest.raises(ValueError, match="unified context is \\(n_ctx, width\\)"):
        transfer_context(csc_context(), SOURCE, False, ["tench"])
