"""Optuna's TPE for packed sweeps: a pack of configurations asked at a time, each told its own result."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from platform.sweep.packs import PACK_KEY, member_id, member_reports, pack_sizes
from typing import Any

import optuna
from ray.tune.search import Searcher


class PackedOptunaSearch(Searcher):
    """Optuna's seeded TPE asked for a pack of configurations at a time (ask-and-tell), told each one's result.

    ``distributions``: the searched fields' Optuna distributions (the sweep's space as Ray's ``OptunaSearch``
    converts it). ``num_configs`` configurations in all, at most ``pack_size`` per Tune trial; then it is finished.
    Each member is told as Ray's ``OptunaSearch`` tells a trial: its last validation accuracy as COMPLETE (an
    ASHA-stopped member's too), PRUNED without one, FAIL without one when its pack errored.
    """

    def __init__(self, distributions: Mapping[str, optuna.distributions.BaseDistribution], *, pack_size: int,
                 num_configs: int, seed: int, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._distributions = dict(distributions)
        direction = "maximize" if mode == "max" else "minimize"
        self._seed, self._direction = seed, direction
        self._study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction=direction)
        self._sizes = pack_sizes(num_configs, pack_size)  # the packs' sizes, as a grid's
        self._asked: dict[str, list[optuna.trial.Trial]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._sizes:
            return Searcher.FINISHED
        k = self._sizes.pop(0)
        asked = [self._study.ask(self._distributions) for _ in range(k)]
        self._asked[trial_id] = asked
        return {PACK_KEY: [dict(t.params) for t in asked]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        asked = self._asked.pop(trial_id, None)
        if asked is None:
            return
        reports = member_reports(result)
        for j, ot_trial in enumerate(asked):
            value = reports.get(member_id(trial_id, j), {}).get(self.metric)
            if value is not None and not math.isnan(value):
                self._study.tell(ot_trial, value, state=optuna.trial.TrialState.COMPLETE)
            else:
                state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
                self._study.tell(ot_trial, None, state=state)

    @property
    def study(self) -> optuna.Study:
        return self._study

    def save(self, checkpoint_path: str) -> None:
        """The searcher's state as JSON (no pickle): the packs still to ask, every told configuration's values and
        result, and the packs asked but not yet told."""
        told = [{"params": t.params, "state": t.state.name, "value": t.value} for t in self._study.trials
                if t.state.is_finished()]
        state = {"sizes": self._sizes, "told": told,
                 "asked": {tid: [t.params for t in trials] for tid, trials in self._asked.items()}}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        """Rebuild the study from :meth:`save`'s JSON: the told configurations added as finished trials (TPE learns
        from them), the asked ones asked again with the same values (their packs are still running)."""
        state = json.loads(Path(checkpoint_path).read_text())
        self._sizes = list(state["sizes"])
        self._study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=self._seed),
                                          direction=self._direction)
        for t in state["told"]:
            self._study.add_trial(optuna.trial.create_trial(
                params=t["params"], distributions=self._distributions, state=optuna.trial.TrialState[t["state"]],
                value=t["value"]))
        self._asked = {}
        for tid, params in state["asked"].items():
            for p in params:
                self._study.enqueue_trial(p)
            self._asked[tid] = [self._study.ask(self._distributions) for _ in params]
