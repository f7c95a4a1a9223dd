"""The learned context in words: the vocabulary words nearest to each context vector of the best trial (CoOp's
Sec. 4.5), per position for a unified context and per class for a class-specific one (CSC)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coop_core.interpret import parse_nearest_words_table  # noqa: E402


def plot_nearest_words(table_text: str, path: Path, *, title: str) -> dict[str, list[list[str]]]:
    """A table picture of a nearest-words table (``coop_core.interpret.nearest_words_table``).

    Unified context: one row per position, the top words with their distances. CSC: one row per class, one column
    per position with its nearest word.

    Returns:
        The words drawn: ``{set name: [position][rank] -> word}``.
    """
    sets = parse_nearest_words_table(table_text)
    if "shared" in sets:
        ranked = sets["shared"]
        n_rank = max(len(r) for r in ranked)
        cells = [[f"{w} ({d:.2f})" for w, d in r] + [""] * (n_rank - len(r)) for r in ranked]
        rows = [f"position {i + 1}" for i in range(len(ranked))]
        cols = [f"nearest #{k + 1}" for k in range(n_rank)]
        kind = "unified context, per position"
    else:
        n_pos = max(len(v) for v in sets.values())
        cells = [[r[0][0] if r else "" for r in v] + [""] * (n_pos - len(v)) for v in sets.values()]
        rows = list(sets)
        cols = [f"pos {p + 1}" for p in range(n_pos)]
        kind = "class-specific context (CSC), nearest word per class and position"
    fig, ax = plt.subplots(figsize=(min(2.0 + 1.7 * len(cols), 24), 1.2 + 0.32 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=rows, colLabels=cols, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.2)
    ax.set_title(f"{title}\n{kind}", fontsize=10)
    with warnings.catch_warnings():
        # Nearest tokens of an untrained context can be emoji that the default font lacks; they draw as boxes.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {name: [[w for w, _ in r] for r in ranked] for name, ranked in sets.items()}
