"""ASHA's rule for the members of packed trials: the same decision Ray Tune's ``ASHAScheduler`` makes for a trial,
made for each configuration of a pack.

A packed trial (``--pack-size``) trains several configurations in one Tune trial, so Tune's scheduler sees one trial
and cannot stop one configuration. :class:`AshaRungs` is ASHA's bookkeeping (one bracket, as ``ASHAScheduler`` uses
by default): rungs at ``grace_period * reduction_factor**k`` epochs below ``max_t``; a configuration reaching a rung is
recorded there and stopped when its metric is below the ``1 - 1/reduction_factor`` quantile of what that rung
recorded before it. ``tests/platform/test_packed_sweep.py`` checks it decides exactly as Ray's bracket on the same
sequence of results.

The records are the sweep's, not a pack's: :class:`RungsActor` holds them for every pack of a sweep (a named Ray
actor the driver starts), so a configuration is judged against every configuration of the sweep that reached the
rung before it, in whatever pack it ran -- as ASHA judges trials. It saves them in the sweep folder after each record,
so a resumed sweep keeps judging against them. A pack asks it only at a rung (:class:`RungsClient`): between rungs
ASHA's answer is always to go on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RUNGS_FILE = "pack_rungs.json"  # in the sweep folder: the ASHA records of a packed sweep's configurations
RUNGS_ACTOR_PREFIX = "coop_pack_rungs_"  # + the sweep's name


class AshaRungs:
    """ASHA's rungs for one bracket (see the module docstring); ``stop(key, epoch, value)`` is its decision."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float) -> None:
        if grace_period < 1 or reduction_factor <= 1 or max_t < grace_period:
            raise ValueError(f"ASHA needs 1 <= grace_period <= max_t and reduction_factor > 1, got grace_period "
                             f"{grace_period}, max_t {max_t}, reduction_factor {reduction_factor}")
        self.max_t, self.grace_period, self.rf = max_t, grace_period, reduction_factor
        n_rungs = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
        self.rungs: list[tuple[float, dict[str, float]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(n_rungs))]

    def _cutoff(self, recorded: dict[str, float]) -> float | None:
        if not recorded:
            return None
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100))

    def stop(self, key: str, epoch: int, value: float | None) -> bool:
        """Whether the configuration ``key`` stops after ``epoch`` with metric ``value`` (higher is better)."""
        if epoch >= self.max_t:
            return True
        for milestone, recorded in self.rungs:
            if epoch < milestone or key in recorded:
                continue
            cutoff = self._cutoff(recorded)
            stop = cutoff is not None and value is not None and value < cutoff
            if value is not None:
                recorded[key] = value
            return stop
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"max_t": self.max_t, "grace_period": self.grace_period, "reduction_factor": self.rf,
                "rungs": [[m, rec] for m, rec in self.rungs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AshaRungs:
        rungs = cls(data["max_t"], data["grace_period"], data["reduction_factor"])
        saved = {float(m): rec for m, rec in data["rungs"]}
        rungs.rungs = [(m, dict(saved.get(float(m), {}))) for m, _ in rungs.rungs]
        return rungs


class RungsClient:
    """A pack's side of the sweep's :class:`RungsActor`: ``stop(key, epoch, value)`` is the actor's decision, asked
    only when the actor could say stop. :meth:`AshaRungs.stop` records a configuration at the highest rung at or
    below its epoch that does not hold it yet and decides there; with no such rung it answers False. The client
    keeps which rungs hold each of its configurations (a subset of the actor's: a rung it notes holds the
    configuration once the actor was asked there), so it skips the call only where the actor would find no rung.

    ``ask(key, epoch, value)``: the actor's ``stop``. ``max_t``, ``milestones``: the actor's (:meth:`RungsActor.plan`).
    """

    def __init__(self, ask: Callable[[str, int, float | None], bool], max_t: int, milestones: list[float]) -> None:
        self.ask, self.max_t, self.milestones = ask, max_t, sorted(milestones)
        self.held: dict[str, set[float]] = {}

    def stop(self, key: str, epoch: int, value: float | None) -> bool:
        if epoch >= self.max_t:
            return True
        held = self.held.setdefault(key, set())
        open_rungs = [m for m in self.milestones if epoch >= m and m not in held]
        if not open_rungs:
            return False
        decision = self.ask(key, epoch, value)
        if value is not None and not math.isnan(value):
            held.add(open_rungs[-1])
        return decision


class RungsActor:
    """The sweep's :class:`AshaRungs`, shared by its packs (wrapped with ``ray.remote`` by the driver); saved to
    ``save_dir/pack_rungs.json`` whenever a rung records a result, when the sweep folder is local."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float, save_dir: str | None) -> None:
        self.path = Path(save_dir) / RUNGS_FILE if save_dir and "://" not in save_dir else None
        saved = None
        if self.path is not None and self.path.exists():
            saved = AshaRungs.from_dict(json.loads(self.path.read_text()))
        if saved is not None and (saved.max_t, saved.grace_period, saved.rf) == (max_t, grace_period,
                                                                               reduction_factor):
            self.rungs = saved
        else:
            self.rungs = AshaRungs(max_t, grace_period, reduction_factor)

    def plan(self) -> tuple[int, list[float]]:
        """``max_t`` and the rungs' milestones (for :class:`RungsClient`)."""
        return self.rungs.max_t, [m for m, _ in self.rungs.rungs]

    def stop(self, key: str, epoch: int, value: float | None) -> bool:
        recorded = sum(len(r) for _, r in self.rungs.rungs)
        decision = self.rungs.stop(key, epoch, None if value is None or math.isnan(value) else value)
        if self.path is not None and sum(len(r) for _, r in self.rungs.rungs) != recorded:  # saved when it changed
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rungs.to_dict()))
            os.replace(tmp, self.path)
        return decision
