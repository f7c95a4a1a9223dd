"""The search itself, through Optuna's own analysis: parameter importances and a parallel-coordinates view.

A sweep's Optuna study lives inside Ray Tune's searcher, so the study is rebuilt from MLflow: one completed Optuna
trial per sweep trial, with the searched values as params (distributions from the dataset's ``tune_spaces`` entry,
or categorical over the values seen, for a grid) and the last reported validation accuracy as the value, which is
what the searcher saw. Optuna's importance evaluator (PED-ANOVA by default) and its plots then work as on any study.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from run_format import SELECTION_METRIC

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from dashboards.sweep import Sweep, parse_value  # noqa: E402


def _distribution(field: str, values: Sequence[Any], dataset: str, is_grid: bool):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if not is_grid:
        try:
            from tune_spaces import Choice, LogUniform, get_space

            domain = get_space(dataset).get(field)
        except ValueError:
            domain = None
        if isinstance(domain, LogUniform):
            return FloatDistribution(min(domain.low, *values), max(domain.high, *values), log=True)
        if isinstance(domain, Choice) and set(values) <= set(domain.values):
            return CategoricalDistribution(list(domain.values))
    if all(isinstance(v, float) for v in values) and len(set(values)) > 1:
        return FloatDistribution(min(values), max(values), log=min(values) > 0)
    return CategoricalDistribution(sorted(set(values), key=lambda v: (str(type(v)), v)))


def study_from_sweep(sweep: Sweep) -> optuna.Study:
    """An in-memory Optuna study with one completed trial per sweep trial that reported ``val_acc``.

    Raises:
        ValueError: fewer than two trials reported a validation accuracy (nothing to compare).
    """
    fields = [f for f in sweep.searched if any(f in t.params for t in sweep.trials)]
    trials = [t for t in sweep.trials if t.final_val is not None and all(f in t.params for f in fields)]
    if len(trials) < 2 or not fields:
        raise ValueError(f"sweep {sweep.name}: {len(trials)} trial(s) with {SELECTION_METRIC} over {len(fields)} "
                         "searched field(s); the search views need two trials and one searched field")
    values = {f: [parse_value(t.params[f]) for t in trials] for f in fields}
    is_grid = sweep.params.get("sweep.grid", "-") not in ("", "-")
    dists = {f: _distribution(f, values[f], sweep.dataset, is_grid) for f in fields}
    study = optuna.create_study(direction="maximize", study_name=sweep.name)
    for i, t in enumerate(trials):
        params = {f: values[f][i] for f in fields}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.final_val,
                                                  user_attrs={"trial_id": t.trial_id,
                                                              "stopped_early": t.stopped_early}))
    return study


def plot_importances(study: optuna.Study, path: Path) -> dict[str, float]:
    """Optuna's parameter importances for validation accuracy as a bar chart; returns the importances."""
    def target(trial: optuna.trial.FrozenTrial) -> float:
        return -trial.value  # PED-ANOVA explains what makes the target *low*; we want what makes val_acc high

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # optuna's matplotlib backend
        # It warns on any maximising study that its target is minimised; `target` above is already negated.
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes the importances")
        # With a handful of trials all of them can fall in PED-ANOVA's top quantile; the chart then shows equal bars.
        warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")
        importances = optuna.importance.get_param_importances(study, target=target)
        ax = optuna.visualization.matplotlib.plot_param_importances(study, target=target,
                                                                    target_name=SELECTION_METRIC)
    ax.set_xlabel(f"importance for {SELECTION_METRIC} ({len(study.trials)} trials)")
    fig = ax.figure
    fig.set_size_inches(8, max(2.5, 0.6 * len(importances) + 1.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return dict(importances)


def plot_parallel(study: optuna.Study, html_path: Path, png_path: Path) -> list[dict[str, Any]]:
    """The search in parallel coordinates: an interactive HTML (plotly, self-contained) and a PNG.

    Returns:
        The rows drawn: each trial's params and value.
    """
    fig = optuna.visualization.plot_parallel_coordinate(study, target_name=SELECTION_METRIC)
    fig.update_layout(title=f"{study.study_name}: every trial's searched values and {SELECTION_METRIC}")
    fig.write_html(str(html_path), include_plotlyjs=True, full_html=True)  # opens offline, inside the MLflow UI
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims")  # one value
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, target_name=SELECTION_METRIC)
    mfig = ax.figure
    mfig.set_size_inches(10, 5)
    mfig.tight_layout()
    mfig.savefig(png_path, dpi=110)
    plt.close(mfig)
    return [{"trial_id": t.user_attrs["trial_id"], **t.params, SELECTION_METRIC: t.value} for t in study.trials]
