"""The sweep's MLflow parent run: opened with the sweep's settings, closed with its outcome and dashboards."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform import tracking
from platform.artifacts import ACCURACY_KEYS, DASHBOARDS_ARTIFACT_DIR
from platform.sweep.plan import METRIC, InfraSettings, SweepPlan, SweepSettings, grid_epochs
from platform.sweep.state import SweepState, write_sweep_state
from typing import Any

from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


def open_sweep(settings: SweepSettings, infra: InfraSettings, spec: Any, space: Mapping[str, Any],
               grid: Mapping[str, Sequence[Any]], name: str, sweep_dir: str, max_concurrent: int, runner: str,
               gpus_per_trial: float, plan: SweepPlan = SweepPlan(), *,
               pack_size: int = 1) -> SweepState:
    """Start the sweep's MLflow parent run (base config and sweep settings as params) and write its state file."""

    tracking_uri = tracking.resolve_tracking_uri(infra.tracking_uri)
    experiment = infra.experiment or tracking.default_experiment(spec.dataset)
    epochs = grid_epochs(spec, grid)
    num_samples = settings.resolved_num_samples(grid)
    parent_run_id = tracking.create_run(experiment, run_name=name, tracking_uri=tracking_uri,
                                        tags={"coop.entry_point": plan.entry_point, "coop.sweep": name,
                                              "coop.sweep_dir": sweep_dir})
    search_seed = spec.train.seed if settings.search_seed is None else settings.search_seed
    sweep_params = {"sweep.num_samples": num_samples, "sweep.max_concurrent": max_concurrent,
                    "sweep.search_seed": search_seed, "sweep.searcher": "grid" if grid else "optuna-tpe",
                    "sweep.grid": json.dumps(grid) if grid else "-",
                    "sweep.scheduler": f"asha(metric={METRIC}, grace={settings.grace_period}, "
                                       f"rf={settings.reduction_factor}, max_t={epochs})" if plan.early_stopping
                                       else "none (every trial runs all its epochs)",
                    "sweep.space": json.dumps({k: repr(v) for k, v in space.items()}),
                    "sweep.fixed": " ".join(settings.fixed) or "-", "sweep.trial_runner": runner,
                    "sweep.gpus_per_trial": gpus_per_trial, "sweep.max_failures": settings.max_failures,
                    "sweep.pack_size": pack_size}
    tracking.log_params(parent_run_id, tracking.flatten_params(spec) | sweep_params, tracking_uri=tracking_uri)
    experiment_id = tracking.get_or_create_experiment(experiment, tracking_uri=tracking_uri)
    searched = list(grid) if grid else list(space)
    view_key = save_sweep_view(experiment_id, name, searched, tracking_uri)
    runs_url = tracking.runs_view_url(tracking_uri, experiment_id, view_key)
    what = (f"grid over {', '.join(f'`{k}`' for k in searched)}" if grid
            else f"Optuna TPE over {', '.join(f'`{k}`' for k in searched) or 'nothing (all fixed)'}")
    description = plan.describe(spec, {"name": name, "sweep_dir": sweep_dir, "experiment_id": experiment_id,
                                       "view_key": view_key, "parent_run_id": parent_run_id}) if plan.describe else (
        f"**Sweep `{name}`** of CoOp on {spec.dataset} ({spec.train.shots}-shot, `{spec.model.backbone}`, "
        f"{epochs} epochs per trial): {what}, ASHA on `{METRIC}`. Each trial is a child run below.\n\n"
        f"- [trials table]({tracking.runs_view_link(experiment_id, view_key)}) (accuracies and searched parameters as "
        "columns)\n"
        f"- dashboards: the `{DASHBOARDS_ARTIFACT_DIR}/` artifacts of this run, drawn when the sweep ends "
        f"(again: `python -m dashboards --parent-run-id {parent_run_id}`)\n"
        f"- sweep folder (Ray Tune state, checkpoints): `{sweep_dir}`")
    tracking.set_description(parent_run_id, description, tracking_uri=tracking_uri)
    state = SweepState(dataset=spec.dataset, base_spec=spec.to_dict(), parent_run_id=parent_run_id,
                       tracking_uri=tracking_uri, experiment=experiment, experiment_id=experiment_id,
                       started_at=time.time(), runs_url=runs_url, num_samples=num_samples, search_seed=search_seed,
                       epochs=epochs, trial_runner=runner, gpus_per_trial=gpus_per_trial,
                       max_failures=settings.max_failures, grid={k: list(v) for k, v in grid.items()}, kind=plan.kind,
                       entry_point=plan.entry_point, early_stopping=plan.early_stopping, register=plan.register,
                       resume_flags=tuple(plan.resume_flags), pack_size=pack_size)
    if "://" not in sweep_dir:
        write_sweep_state(sweep_dir, state)
    return state


def save_sweep_view(experiment_id: str, name: str, searched: Sequence[str], tracking_uri: str) -> str:
    """Save the sweep's view of the runs table: accuracies and searched parameters as columns
    (``platform.tracking.save_runs_view``); returns the view key."""
    columns = [*(tracking.metric_column(k) for k in ACCURACY_KEYS), *(tracking.param_column(k) for k in searched),
               f"tags.`{tracking.EARLY_STOPPED_TAG}`"]
    key = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return tracking.save_runs_view(experiment_id, key, columns=columns, tracking_uri=tracking_uri)


def close_unclosed_runs(callback: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Close the child runs of trials that ended while no driver was watching (a killed or interrupted driver), so
    no run stays RUNNING: finished trials become FINISHED (with their metrics and artifacts from the checkpoint),
    failed and errored ones FAILED with the reason.

    A run whose trial the sweep no longer has is a trial Tune started after its last experiment-state save before the
    driver was killed: ``--resume`` restores that state, so the trial is gone (its search space point is suggested
    again). Its run is ended KILLED, tagged why and moved to MLflow's trash (``TrialRuns.discard_lost``), so the sweep
    keeps one run per trial."""
    runs = callback.runs.child_runs()
    known = {row["trial_id"] for row in rows}
    for trial_id, run in runs.items():
        if trial_id not in known:
            callback.runs.discard_lost(trial_id, run)
    for row in rows:
        run = runs.get(row["trial_id"])
        status = run.info.status if run is not None else None
        if row["status"] == "TERMINATED" and status != "FINISHED" or row["status"] == "FAILED" and status != "FAILED":
            callback.finish_from_result(row["trial_id"], row["config"], row["last_result"], row["checkpoint_path"])
        elif row["status"] == "ERROR" and status != "FAILED":
            callback.mark_failed(row["trial_id"], row["config"], row["failure"] or "error (see the trial's Ray logs)")


def draw_dashboards(state: SweepState, sweep_dir: str) -> dict[str, str]:
    """Draw the sweep's dashboards (``dashboards.report``) and log them to its parent run; the files by name.

    A failure here costs the pictures, never the sweep: it is logged in one line and the report says how to retry.
    """

    # Imported when drawing, not at the top: after platform.tune's own imports, dashboards.report (matplotlib, Optuna's
    # plots, MLflow) adds 2.2-4.6 s (measured on the 2-core development machine), which --help and a bad input that
    # ends the CLI before any trial would pay for nothing.
    from dashboards.report import build_dashboards

    out = Path(sweep_dir) / DASHBOARDS_ARTIFACT_DIR if "://" not in sweep_dir else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = build_dashboards(MlflowClient(state.tracking_uri), state.parent_run_id, out or Path(tmp),
                                      log=True)
    except Exception as err:  # a plotting or store error: keep the sweep's outcome
        logger.warning("dashboards not drawn (%s: %s); retry with: python -m dashboards --parent-run-id %s",
                       type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "",
                       state.parent_run_id)
        return {}
    return result["files"] if out is not None else {k: f"{DASHBOARDS_ARTIFACT_DIR}/{Path(v).name}"
                                                    for k, v in result["files"].items()}


def close_sweep(summary: Mapping[str, Any], state: SweepState) -> None:
    """Log the sweep's outcome on the parent run and end it (FINISHED, or FAILED when no trial finished)."""

    uri, parent = state.tracking_uri, state.parent_run_id
    best = {k: summary[k] for k in ACCURACY_KEYS if summary[k] is not None}
    # The best trial's accuracies also go under the trials' own keys, so the sweep's row of the runs table shows them
    # in the same columns as its trials; best_* keep their explicit names for scripts.
    final = best | {f"best_{k}": v for k, v in best.items()}
    final |= {"trials_completed": summary["trials_completed"], "trials_errored": summary["trials_errored"],
              "sweep_wall_s": summary["wall_s"]}
    final |= {f"sweep_{k}": v for k, v in (summary.get("timing") or {}).items()
              if (k.startswith("median_") or k in ("trials_per_hour", "trials_per_hour_running", "overhead_share"))
              and v is not None}
    tracking.log_final_metrics(parent, final, tracking_uri=uri)
    client = MlflowClient(uri)
    if summary["best_trial_id"] is not None:
        client.set_tag(parent, tracking.BEST_TRIAL_TAG, summary["best_trial_id"])
        if summary["registered_version"] is not None:
            client.set_tag(parent, "coop.registered_version", str(summary["registered_version"]))
    tracking.end_run(parent, "FINISHED" if summary["best_trial_id"] is not None else "FAILED", tracking_uri=uri)
