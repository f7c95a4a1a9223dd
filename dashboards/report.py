"""A sweep's dashboards, drawn from MLflow and logged back to its parent run: ``python -m dashboards``.

:func:`build_dashboards` writes, for one sweep (its parent run), into a folder and (with ``log``) under the parent
run's ``dashboards/`` artifacts, where the MLflow UI shows them:

- ``val_curves.png``: validation accuracy of every trial by epoch, ASHA-stopped trials dashed and crossed;
- ``param_importances.png``: Optuna's parameter importances for validation accuracy;
- ``parallel_coordinates.html`` (interactive) and ``.png``: every trial's searched values and validation accuracy;
- ``acc_vs_shots.png``: test accuracy against shots beside zero-shot CLIP, when several shot counts were trained;
- ``nearest_words.png``: the best trial's context in words, per position (unified) or per class (CSC);
- ``dimensions.png`` and ``summary.md``: validation accuracy by searched value, and the trials ranked by it.

``platform.tune`` draws them when a sweep ends; this module draws them again for any past sweep.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from run_format import DASHBOARDS_ARTIFACT_DIR, NEAREST_WORDS_FILE, SELECTION_METRIC, TEST_METRIC

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dashboards.curves import plot_val_curves  # noqa: E402
from dashboards.search import plot_importances, plot_parallel, study_from_sweep  # noqa: E402
from dashboards.shots import plot_acc_vs_shots  # noqa: E402
from dashboards.sweep import Sweep, Trial, load_sweep  # noqa: E402
from dashboards.words import plot_nearest_words  # noqa: E402

logger = logging.getLogger(__name__)

DIMENSIONS = ("prompt.n_ctx", "prompt.ctx_init", "prompt.class_token_position", "prompt.csc", "train.lr")
FILES = {"val_curves": "val_curves.png", "param_importances": "param_importances.png",
         "parallel_html": "parallel_coordinates.html", "parallel_png": "parallel_coordinates.png",
         "acc_vs_shots": "acc_vs_shots.png", "nearest_words": "nearest_words.png", "dimensions": "dimensions.png",
         "summary": "summary.md"}


def plot_dimensions(trials: Sequence[Trial], path: Path, metric: str = SELECTION_METRIC) -> Path:
    """Best ``metric`` of each trial against each searched dimension (categorical as strips, lr on a log axis)."""
    dims = [d for d in DIMENSIONS if any(d in t.params for t in trials)]
    cols = max(len(dims), 1)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        points = [(t.params[dim], _best(t, metric)) for t in trials if dim in t.params and _best(t, metric) is not None]
        if dim == "train.lr":
            ax.scatter([float(v) for v, _ in points], [y for _, y in points], s=14)
            ax.set_xscale("log")
        else:
            cats = sorted({v for v, _ in points}, key=_category_key)
            ax.scatter([cats.index(v) for v, _ in points], [y for _, y in points], s=14)
            ax.set_xticks(range(len(cats)), [(c if c else "random")[:14] for c in cats], rotation=30, fontsize=7)
        ax.set_title(dim, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"best {metric} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _category_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _fmt(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.4g}"


def _best(trial: Trial, metric: str) -> float | None:
    if trial.val_curve:
        return max(v for _, v in trial.val_curve)
    value = trial.metrics.get(metric)
    return None if value is None or math.isnan(value) else value


def summary_markdown(trials: Sequence[Trial], metric: str = SELECTION_METRIC) -> str:
    """A Markdown table of trials sorted by best validation accuracy (test accuracy shown, never used to rank)."""
    rows = sorted(trials, key=lambda t: -(_best(t, metric) or -1.0))
    lines = [f"| trial | best {metric} | test_acc | epochs | " + " | ".join(DIMENSIONS) + " |",
             "|" + "---|" * (4 + len(DIMENSIONS))]
    for t in rows:
        best = _best(t, metric)
        test = t.metrics.get(TEST_METRIC)
        lines.append(
            f"| {t.name} | {best:.2f} | {'' if test is None else f'{test:.2f}'} | {len(t.val_curve)} | "
            if best is not None else f"| {t.name} | | | {len(t.val_curve)} | "
        )
        lines[-1] += " | ".join(_fmt(str(t.params.get(d, ""))) for d in DIMENSIONS) + " |"
    return "\n".join(lines) + "\n"


def build_dashboards(client: MlflowClient, parent_run_id: str, out_dir: Path, *, log: bool = False
                     ) -> dict[str, Any]:
    """Draw every dashboard of the sweep ``parent_run_id`` into ``out_dir``; with ``log``, log them to the run.

    A view that the sweep cannot have is skipped with the reason in the result's ``skipped`` (acc-vs-shots with one
    shot count; the search views with fewer than two trials; nearest words before any trial finished).

    Returns:
        ``{"files": {name: path}, "skipped": {name: reason}, "drawn": {name: the data each picture shows}}``.

    Raises:
        ValueError: the run is not a sweep's parent run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = load_sweep(client, parent_run_id)
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    drawn: dict[str, Any] = {}
    path = out_dir / FILES["val_curves"]
    drawn["val_curves"] = plot_val_curves(sweep.trials, path, epochs=sweep.epochs)
    files["val_curves"] = path
    try:
        study = study_from_sweep(sweep)
    except ValueError as err:
        skipped["param_importances"] = skipped["parallel_coordinates"] = str(err)
    else:
        files["param_importances"] = out_dir / FILES["param_importances"]
        drawn["param_importances"] = plot_importances(study, files["param_importances"])
        files["parallel_html"] = out_dir / FILES["parallel_html"]
        files["parallel_png"] = out_dir / FILES["parallel_png"]
        drawn["parallel_coordinates"] = plot_parallel(study, files["parallel_html"], files["parallel_png"])
    shots = plot_acc_vs_shots(sweep.trials, out_dir / FILES["acc_vs_shots"])
    if shots is None:
        skipped["acc_vs_shots"] = "fewer than two shot counts ran all their epochs"
    else:
        files["acc_vs_shots"], drawn["acc_vs_shots"] = out_dir / FILES["acc_vs_shots"], shots
    words = _nearest_words(client, sweep, out_dir / FILES["nearest_words"])
    if isinstance(words, str):
        skipped["nearest_words"] = words
    else:
        files["nearest_words"], drawn["nearest_words"] = out_dir / FILES["nearest_words"], words
    files["dimensions"] = plot_dimensions(sweep.trials, out_dir / FILES["dimensions"])
    files["summary"] = out_dir / FILES["summary"]
    files["summary"].write_text(summary_markdown(sweep.trials))
    if log:
        for f in files.values():
            client.log_artifact(parent_run_id, str(f), artifact_path=DASHBOARDS_ARTIFACT_DIR)
    return {"files": {k: str(v) for k, v in files.items()}, "skipped": skipped, "drawn": drawn}


def _nearest_words(client: MlflowClient, sweep: Sweep, path: Path) -> dict[str, list[list[str]]] | str:
    """The best trial's nearest-words picture, or why there is none."""
    best = sweep.best_trial()
    if best is None:
        return "no trial ran all its epochs"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(best.run_id, NEAREST_WORDS_FILE, tmp)
        except Exception as err:  # an MLflow store error names the missing artifact
            return f"trial {best.trial_id} has no {NEAREST_WORDS_FILE}: {str(err).splitlines()[0]}"
        text = Path(local).read_text()
    csc = best.params.get("prompt.csc") == "True"
    title = (f"nearest words of the learned context: best trial {best.trial_id} "
             f"({SELECTION_METRIC} {best.final_val:.1f}, {'CSC' if csc else 'unified'})")
    return plot_nearest_words(text, path, title=title)
