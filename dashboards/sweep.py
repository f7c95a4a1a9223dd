"""A sweep as the dashboards read it from MLflow: the parent run, its trials (child runs) and what was searched.

Reads only MLflow, so it works for any finished or running sweep from any machine that reaches the tracking store.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from run_format import BEST_TRIAL_TAG, EARLY_STOPPED_TAG, PARENT_RUN_TAG, SELECTION_METRIC, SWEEP_TAG, TRIAL_TAG

SEARCHED_FIELDS = ("prompt.n_ctx", "prompt.ctx_init", "prompt.class_token_position", "prompt.csc", "train.lr",
                   "train.shots")


@dataclass
class Trial:
    """One child run: its params, final metrics, validation-accuracy curve and whether ASHA stopped it."""

    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    val_curve: list[tuple[int, float]]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def trial_id(self) -> str:
        return self.tags.get(TRIAL_TAG, self.name)

    @property
    def stopped_early(self) -> bool:
        return self.tags.get(EARLY_STOPPED_TAG) == "true"

    @property
    def final_val(self) -> float | None:
        """The last validation accuracy it reported (what the searcher and ASHA saw)."""
        if self.val_curve:
            return self.val_curve[-1][1]
        value = self.metrics.get(SELECTION_METRIC)
        return None if value is None or math.isnan(value) else value


@dataclass
class Sweep:
    """A sweep's parent run and its trials."""

    parent_run_id: str
    name: str
    experiment_id: str
    params: dict[str, str]
    tags: dict[str, str]
    trials: list[Trial]

    @property
    def searched(self) -> list[str]:
        """The fields the sweep searched: its space's keys, or its grid's."""
        grid = self.params.get("sweep.grid", "-")
        if grid not in ("", "-"):
            return list(json.loads(grid))
        space = self.params.get("sweep.space")
        if space:
            return list(json.loads(space))
        return [f for f in SEARCHED_FIELDS if len({t.params.get(f) for t in self.trials}) > 1]

    @property
    def dataset(self) -> str:
        return self.params.get("dataset", "")

    @property
    def epochs(self) -> int | None:
        value = self.params.get("train.resolved_epochs") or self.params.get("train.epochs")
        try:
            return int(value) if value not in (None, "None") else None
        except ValueError:
            return None

    def best_trial(self) -> Trial | None:
        """The registered best trial (tag written when the sweep ended), else the best finished one by validation."""
        best_id = self.tags.get(BEST_TRIAL_TAG)
        for t in self.trials:
            if best_id is not None and t.trial_id == best_id:
                return t
        finished = [t for t in self.trials if not t.stopped_early and t.final_val is not None]
        return max(finished, key=lambda t: t.final_val) if finished else None


def load_sweep(client: MlflowClient, parent_run_id: str, metric: str = SELECTION_METRIC) -> Sweep:
    """The sweep whose parent run is ``parent_run_id``, with every child run's ``metric`` history.

    Raises:
        ValueError: the run has no child runs (it is not a sweep's parent run).
    """
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'", max_results=10_000)
    trials = []
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        history = client.get_metric_history(run.info.run_id, metric)
        curve = sorted((int(m.step), float(m.value)) for m in history)
        trials.append(Trial(run.info.run_id, run.info.run_name or run.info.run_id[:8], dict(run.data.params),
                            dict(run.data.metrics), curve, dict(run.data.tags)))
    if not trials:
        raise ValueError(f"run {parent_run_id} has no child runs: is it a sweep's parent run?")
    return Sweep(parent_run_id, parent.info.run_name or parent_run_id[:8], parent.info.experiment_id,
                 dict(parent.data.params), dict(parent.data.tags), trials)


def find_sweep(client: MlflowClient, sweep_name: str, experiment: str | None = None) -> str:
    """The parent run id of the sweep called ``sweep_name`` (the latest, if run twice), in ``experiment`` or any.

    Raises:
        ValueError: no such experiment or sweep.
    """
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment {experiment!r}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    parents = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    if not parents:
        raise ValueError(f"no sweep {sweep_name!r} in {f'experiment {experiment!r}' if experiment else 'this store'}")
    return parents[0].info.run_id


def parse_value(text: str) -> Any:
    """A param string back to a value: ``"8"`` -> 8, ``"0.002"`` -> 0.002, ``"True"`` -> True, text stays text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
