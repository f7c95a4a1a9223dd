"""A study's figure (``platform/study.py``): CoOp's test accuracy against shots, mean ± std over the seeds with every
seed's point, beside zero-shot CLIP — the paper's few-shot figure — for the training data and each evaluation target.
With a single shot count it is a bar chart of CoOp against zero-shot per dataset instead."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dashboards.shots import shots_axis  # noqa: E402


def plot_study(results: Mapping[str, Any], path: Path) -> dict[str, dict[str, Any]] | None:
    """Draw ``results`` (``platform.study.study_results``) to ``path``.

    Returns:
        What was drawn, per dataset: ``{"shots": [...], "coop_mean": [...], "coop_std": [...], "zeroshot": [...],
        "seeds": {shots: [per-seed values]}}``; None when no cell has a value (no figure is written then).
    """
    series: dict[str, dict[str, Any]] = {}
    for c in results["cells"]:
        s = series.setdefault(c["dataset"], {"shots": [], "coop_mean": [], "coop_std": [], "zeroshot": [],
                                             "seeds": {}})
        s["shots"].append(c["shots"])
        s["coop_mean"].append(c["coop_mean"])
        s["coop_std"].append(c["coop_std"])
        s["zeroshot"].append(c["zeroshot_mean"])
        s["seeds"][str(c["shots"])] = list(c["coop_per_seed"].values())
    if not series:
        return None
    numeric = [k for k in results["shots"] if isinstance(k, int)]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_seeds = len(results["seeds"])
    if len(numeric) >= 2:
        for i, (label, s) in enumerate(series.items()):
            color = colors[i % len(colors)]
            xs = [k for k in s["shots"] if isinstance(k, int)]
            idx = [s["shots"].index(k) for k in xs]
            means, stds = [s["coop_mean"][j] for j in idx], [_spread(s["coop_std"][j]) for j in idx]
            ax.errorbar(xs, means, yerr=stds, marker="o", lw=2, capsize=3, color=color,
                        label=f"CoOp on {label} ({_what(n_seeds)})")
            for k in xs:
                values = s["seeds"][str(k)]
                ax.scatter([k] * len(values), values, s=10, color=color, alpha=0.45, zorder=3)
            zs = [s["zeroshot"][j] for j in idx if s["zeroshot"][j] is not None]
            if zs:
                level = sum(zs) / len(zs)  # the same test images at every shot count
                ax.axhline(level, ls="--", color=color if len(series) > 1 else "gray", alpha=0.8,
                           label=f"zero-shot CLIP on {label} ({level:.1f})")
        shots_axis(ax, numeric)
        ax.set_title(f"{results['source']}: CoOp vs zero-shot CLIP ({results['protocol']})")
    else:
        labels = list(series)
        xs = range(len(labels))
        coop = [series[n]["coop_mean"][0] for n in labels]
        stds = [_spread(series[n]["coop_std"][0]) for n in labels]
        zs = [series[n]["zeroshot"][0] or 0.0 for n in labels]
        ax.bar([x - 0.2 for x in xs], coop, 0.4, yerr=stds, capsize=3, label=f"CoOp ({_what(n_seeds)})")
        ax.bar([x + 0.2 for x in xs], zs, 0.4, label="zero-shot CLIP")
        ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{results['source']}, {results['shots'][0]} shots: CoOp vs zero-shot CLIP "
                     f"({results['protocol']})")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series


def _spread(std: float | None) -> float:
    """An error bar's half-height: the standard deviation over seeds, none (0) where there is no spread to show."""
    return 0.0 if std is None else std


def _what(n_seeds: int) -> str:
    return f"mean ± std, {n_seeds} seeds" if n_seeds > 1 else "one seed: no spread"
