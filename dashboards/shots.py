"""Test accuracy against the number of shots, beside zero-shot CLIP: CoOp's headline figure, for a sweep or study
that trained several shot counts (e.g. ``--grid train.shots=1,2,4,8,16``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

from run_format import SELECTION_METRIC, TEST_METRIC, ZEROSHOT_TEST_METRIC

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dashboards.sweep import Trial  # noqa: E402

SHOTS_PARAM = "train.shots"


def best_per_shots(trials: Sequence[Trial]) -> dict[int, Trial]:
    """Per shot count, the finished trial with the highest validation accuracy (test accuracy never chooses)."""
    best: dict[int, Trial] = {}
    for t in trials:
        if t.stopped_early or t.final_val is None or TEST_METRIC not in t.metrics or SHOTS_PARAM not in t.params:
            continue
        shots = int(t.params[SHOTS_PARAM])
        if shots not in best or t.final_val > best[shots].final_val:
            best[shots] = t
    return dict(sorted(best.items()))


def shots_axis(ax, shots: Sequence[int]) -> None:
    """The x axis of an accuracy-vs-shots figure: shots per class on a log-2 scale, a tick at each shot count."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(shots), [str(k) for k in shots])
    ax.set_xlabel("shots per class")


def plot_acc_vs_shots(trials: Sequence[Trial], path: Path) -> dict[str, dict[int, float]] | None:
    """CoOp's test accuracy (best trial by validation per shot count) and zero-shot CLIP's, against shots.

    Returns:
        What was drawn (``{"coop": {shots: acc}, "zeroshot": {shots: acc}}``), or None when fewer than two shot
        counts finished (no figure is written then).
    """
    best = best_per_shots(trials)
    if len(best) < 2:
        return None
    coop = {k: t.metrics[TEST_METRIC] for k, t in best.items()}
    zeroshot = {k: t.metrics[ZEROSHOT_TEST_METRIC] for k, t in best.items() if ZEROSHOT_TEST_METRIC in t.metrics}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(list(coop), list(coop.values()), marker="o", lw=2, label=f"CoOp (best trial by {SELECTION_METRIC})")
    for k, v in coop.items():
        ax.annotate(f"{v:.1f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if zeroshot:
        level = sum(zeroshot.values()) / len(zeroshot)  # the same test images at every shot count
        ax.axhline(level, ls="--", color="gray", label=f"zero-shot CLIP ({level:.1f})")
    shots_axis(ax, list(coop))
    ax.set_ylabel(f"{TEST_METRIC} (%)")
    ax.set_title("test accuracy vs shots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"coop": coop, "zeroshot": zeroshot}
