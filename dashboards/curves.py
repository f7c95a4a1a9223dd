"""Validation accuracy of every trial by epoch, with the trials ASHA stopped drawn as such."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

from run_format import SELECTION_METRIC

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dashboards.sweep import Trial  # noqa: E402

MAX_LEGEND = 16


def plot_val_curves(trials: Sequence[Trial], path: Path, *, epochs: int | None = None,
                    metric: str = SELECTION_METRIC) -> dict[str, list[tuple[int, float]]]:
    """One line per trial; a trial ASHA stopped is dashed and ends in a cross, labelled with its last epoch.

    Returns:
        What was drawn: each trial's ``(epoch, value)`` points, by trial id.
    """
    fig, ax = plt.subplots(figsize=(8, 4.8))
    drawn: dict[str, list[tuple[int, float]]] = {}
    n_stopped = 0
    for t in trials:
        if not t.val_curve:
            continue
        xs, ys = zip(*t.val_curve)
        if t.stopped_early:
            n_stopped += 1
            (line,) = ax.plot(xs, ys, ls="--", lw=1, alpha=0.8, marker="o", ms=2,
                              label=f"{t.trial_id} (ASHA stop @ {xs[-1]})")
            ax.plot(xs[-1:], ys[-1:], marker="x", ms=8, mew=2, color=line.get_color(), ls="none")
        else:
            ax.plot(xs, ys, lw=1.8, marker="o", ms=3, label=t.trial_id)
        drawn[t.trial_id] = list(t.val_curve)
    if epochs:
        ax.set_xlim(0.5, epochs + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} per trial: {len(drawn)} trials, {n_stopped} stopped early by ASHA (dashed, x)")
    ax.grid(alpha=0.3)
    if 0 < len(drawn) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
