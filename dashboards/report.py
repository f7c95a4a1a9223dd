"""Pictures of a sweep from MLflow: learning curves per trial and validation accuracy by search dimension.

Reads only MLflow (parent run + child runs), so it works on any finished or running sweep, from any machine that
can reach the tracking store:

    python -m dashboards.report --tracking-uri sqlite:///mlflow.db --parent-run-id <id> --out report/

With ``--log`` the PNGs and a Markdown summary are logged back as artifacts of the parent run (under ``report/``),
where the MLflow UI shows them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from platform.artifacts import SELECTION_METRIC, TEST_METRIC  # noqa: E402 (run from the repository root)

import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

logger = logging.getLogger(__name__)

DIMENSIONS = ("prompt.n_ctx", "prompt.ctx_init", "prompt.class_token_position", "prompt.csc", "train.lr")


@dataclass
class Trial:
    """One child run: its params, final metrics and validation-accuracy curve."""

    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    val_curve: list[tuple[int, float]]


def load_trials(client: MlflowClient, parent_run_id: str, metric: str = SELECTION_METRIC) -> list[Trial]:
    """The child runs of ``parent_run_id`` with their ``metric`` history."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
    trials = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)
        curve = sorted((int(m.step), float(m.value)) for m in history)
        trials.append(Trial(run.info.run_id, run.info.run_name or run.info.run_id[:8], dict(run.data.params),
                            dict(run.data.metrics), curve))
    return trials


def plot_curves(trials: Sequence[Trial], path: Path, metric: str = SELECTION_METRIC) -> Path:
    """Validation accuracy by epoch, one line per trial (early-stopped trials end early)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        if t.val_curve:
            xs, ys = zip(*t.val_curve)
            ax.plot(xs, ys, marker="o", ms=2, lw=1, label=t.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} per trial ({len(trials)} trials)")
    ax.grid(alpha=0.3)
    if 0 < len(trials) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def build_report(client: MlflowClient, parent_run_id: str, out_dir: Path, log: bool = False) -> dict[str, str]:
    """Write curves.png, dimensions.png and summary.md for a sweep; optionally log them to the parent run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = load_trials(client, parent_run_id)
    if not trials:
        raise ValueError(f"run {parent_run_id} has no child runs: is it a sweep's parent run?")
    files = {
        "curves": plot_curves(trials, out_dir / "curves.png"),
        "dimensions": plot_dimensions(trials, out_dir / "dimensions.png"),
        "summary": out_dir / "summary.md",
    }
    files["summary"].write_text(summary_markdown(trials))
    if log:
        for f in files.values():
            client.log_artifact(parent_run_id, str(f), artifact_path="report")
    return {k: str(v) for k, v in files.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.report",
        description="Plot a CoOp sweep from MLflow: val-accuracy curves per trial and accuracy by search dimension.",
    )
    parser.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)"
    )
    parser.add_argument("--parent-run-id", required=True, help="the sweep's parent run id (printed by platform.tune)")
    parser.add_argument("--out", default="report", help="output folder for PNGs and summary.md (default: %(default)s)")
    parser.add_argument("--log", action="store_true", help="also log the files as artifacts of the parent run")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the file paths last")
    args = parser.parse_args(argv)
    client = MlflowClient(tracking_uri=args.tracking_uri)
    try:
        files = build_report(client, args.parent_run_id, Path(args.out), log=args.log)
    except Exception as err:  # unknown run id, unreachable store: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in files.items():
        print(f"{name:<11} {path}")
    if args.json:
        print(json.dumps(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
