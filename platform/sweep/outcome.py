"""What a sweep's trials came to: one row per trial, the best by validation accuracy, and its registration."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform import artifacts, tracking
from platform.artifacts import EPOCHS_TOTAL_KEY, FAILURE_KEY
from platform.registry import register_prompt, registered_model_name
from platform.sweep import packs
from platform.sweep.state import SweepState
from platform.sweep.trial_runs import checkpoint_dir, error_line, trial_checkpoint_path
from platform.trials import searched_overrides
from typing import Any


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    """What ``run_sweep`` came to, for the CLI to present (``platform.sweep.flags.present``).

    status: the exit status (0 ok, 1 no trial finished or MLflow failed, 2 bad input, 130 interrupted). error: the
    one line of a refused input (status 2; nothing ran). summary: the sweep's summary (``summarise`` and what the
    registration, timing and plan added); None when nothing ran. rows: one per trial (:func:`trial_rows`). notice:
    what an interrupted sweep tells the user (how to finish it).
    """

    status: int
    error: str | None = None
    summary: Mapping[str, Any] | None = None
    rows: tuple[Mapping[str, Any], ...] = ()
    notice: str | None = None


def _trial_ids(grid: Any) -> list[str]:
    """The Tune trial id of each result of a ResultGrid, in its order.

    A result's metrics carry its trial id once the trial reported; one that errored before its first report has none,
    and its folder name (``<trainable>_<trial id>_<tag>_<date>``) is no safe parse (a grid's ids hold underscores).
    The grid's trials, which Ray's ``ResultGrid`` builds its results from in order, give every id.
    """
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is not None and len(trials) == len(grid):
        return [t.trial_id for t in trials]
    return [(r.metrics or {}).get("trial_id") or Path(r.path).name for r in grid]


def trial_rows(grid: Any, epochs: int) -> list[dict[str, Any]]:
    """One summary row per configuration of a ResultGrid (status, epochs reached, metrics, config, checkpoint): a
    trial's, or each member's of a packed trial (``platform/sweep/packs.py``)."""
    rows = []
    for result, trial_id in zip(grid, _trial_ids(grid), strict=True):
        m = result.metrics or {}
        error = error_line(result.error) if result.error is not None else None
        checkpoint = trial_checkpoint_path(result, m)
        if not packs.is_packed(result.config):
            status = "ERROR" if error else "FAILED" if m.get(FAILURE_KEY) else "TERMINATED"
            rows.append(_row(trial_id, status, m, dict(result.config or {}), checkpoint, error, epochs))
            continue
        reports = packs.member_reports(m)
        for mid, config in packs.members(trial_id, result.config):
            r = reports.get(mid, {})
            ended = r.get(packs.STATUS_KEY) in (packs.FINISHED, packs.STOPPED)
            status = "FAILED" if r.get(FAILURE_KEY) else "ERROR" if error and not ended else "TERMINATED"
            rows.append(_row(mid, status, r, config, packs.member_checkpoint(checkpoint, mid),
                             None if ended else error, epochs))
    return rows


def _row(trial_id: str, status: str, m: Mapping[str, Any], config: dict[str, Any], checkpoint: str | None,
         error: str | None, epochs: int) -> dict[str, Any]:
    return {
        "trial_id": trial_id,
        "status": status,
        "epochs": int(m.get("epoch", 0)),
        "finished": status == "TERMINATED" and int(m.get("epoch", 0)) >= int(m.get(EPOCHS_TOTAL_KEY, epochs))
        and "test_acc" in m,
        "config": config,
        "val_acc": m.get("val_acc"),
        "test_acc": m.get("test_acc"),
        "zeroshot_test_acc": m.get("zeroshot_test_acc"),
        "checkpoint_path": checkpoint,
        "failure": m.get(FAILURE_KEY) or error,
        "last_result": dict(m),
    }


def pick_best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The trial with the highest final validation accuracy among those that ran every epoch.

    Early-stopped trials have no final prompts or test accuracy, so they are never chosen; ties go to the earlier
    trial. Test accuracy plays no part.
    """
    candidates = [r for r in rows if r["finished"] and r["val_acc"] is not None and r["checkpoint_path"]]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r["val_acc"], -rows.index(r)))


def summarise(rows: Sequence[Mapping[str, Any]], spec: Any, state: SweepState, name: str, sweep_dir: str,
              resumed: bool) -> dict[str, Any]:
    """The sweep's outcome before registration (trial counts, where things are)."""

    return {
        "sweep_name": name, "sweep_dir": sweep_dir, "dataset": spec.dataset, "epochs": spec.train.resolved_epochs,
        "backbone": spec.model.backbone, "shots": spec.train.shots, "seed": spec.train.seed,
        "trials": len(rows), "trials_completed": sum(r["status"] == "TERMINATED" for r in rows),
        "trials_finished": sum(r["finished"] for r in rows),
        "trials_early_stopped": sum(r["status"] == "TERMINATED" and not r["finished"] for r in rows),
        "trials_errored": sum(r["status"] in ("ERROR", "FAILED") for r in rows),
        "parent_run_id": state.parent_run_id, "experiment": state.experiment,
        "tracking_uri": state.tracking_uri, "ui_command": tracking.ui_command(state.tracking_uri),
        "runs_url": state.runs_url,
        "resumed": resumed, "trial_runner": state.trial_runner, "pack_size": state.pack_size, "best_config": None,
        "best_trial_id": None,
        "best_run_id": None, "val_acc": None,
        "test_acc": None, "zeroshot_test_acc": None, "registered_model": registered_model_name(spec.model_key),
        "registered_version": None, "champion_version": None, "champion_reason": None,
        "register": state.register,
    }


def best_trial_summary(best: Mapping[str, Any], callback: Any) -> dict[str, Any]:
    """The summary fields of the best trial when nothing is registered (a study)."""

    return {"best_config": searched_overrides(best["config"]), "best_trial_id": best["trial_id"],
            "best_run_id": callback.runs.run_for(best["trial_id"], best["config"]), "val_acc": best["val_acc"],
            "test_acc": best["test_acc"], "zeroshot_test_acc": best["zeroshot_test_acc"],
            "n_ctx_effective": best["last_result"].get("n_ctx_effective")}


def register_best(best: Mapping[str, Any], callback: Any, state: SweepState, name: str,
                  storage_path: str) -> dict[str, Any]:
    """Register the best trial's final prompts (``platform.registry``); the summary fields it adds."""

    best_run_id = callback.runs.run_for(best["trial_id"], best["config"])
    with checkpoint_dir(best["checkpoint_path"], storage_path) as d:
        resolved = artifacts.read_config(d)
        registration = register_prompt(
            d, resolved, best["last_result"], run_id=best_run_id, tracking_uri=state.tracking_uri,
            extra_tags={"sweep_run_id": state.parent_run_id, "trial_id": best["trial_id"], "sweep": name},
        )
    return {
        "best_config": searched_overrides(best["config"]), "best_trial_id": best["trial_id"],
        "best_run_id": best_run_id, "val_acc": best["val_acc"], "test_acc": best["test_acc"],
        "zeroshot_test_acc": best["zeroshot_test_acc"], "n_ctx_effective": resolved.get(artifacts.N_CTX_EFFECTIVE_KEY),
        "registered_version": registration.version, "champion_version": registration.champion_version,
        "champion_reason": registration.reason,
    }
