"""The end-of-sweep report a person reads, and the keys of the ``--json`` line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from platform.artifacts import DASHBOARDS_ARTIFACT_DIR
from platform.sweep.timing import format_timing
from platform.sweep.trial_runs import describe_config
from typing import Any

JSON_KEYS = ("best_config", "val_acc", "test_acc", "zeroshot_test_acc", "parent_run_id", "registered_model",
             "registered_version", "champion_version", "trials", "trials_completed", "trials_finished",
             "trials_early_stopped", "trials_errored", "best_trial_id", "best_run_id", "n_ctx_effective", "sweep_name",
             "sweep_dir", "tracking_uri", "experiment", "resumed", "wall_s", "timing", "trial_runner", "pack_size",
             "runs_url", "dashboards", "tracking_complete", "tracking_error", "log_command", "resume_command")


def _pct(value: Any) -> str:
    return f"{value:6.2f}" if isinstance(value, (int, float)) else "     -"


def _dashboards_line(summary: Mapping[str, Any]) -> str:
    files = summary.get("dashboards") or {}
    if not files:
        return f"not drawn (python -m dashboards --parent-run-id {summary['parent_run_id']})"
    folder = Path(next(iter(files.values()))).parent
    return f"{len(files)} files in {folder}, also under the sweep run's {DASHBOARDS_ARTIFACT_DIR}/ artifacts"


def format_report(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The human-readable end-of-sweep report: trials, best configuration beside zero-shot, where to look."""

    lines = ["", f"Sweep {summary['sweep_name']} on {summary['dataset']}: {summary['trials']} trials "
                 f"({summary['trials_finished']} ran all {summary['epochs']} epochs, {summary['trials_early_stopped']} "
                 f"stopped early by ASHA, {summary['trials_errored']} errored) in {summary['wall_s']:.0f}s", ""]
    lines.append("  trial      status      epochs  val acc %  test acc %  config")
    for r in sorted(rows, key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0.0))):
        mark = " *" if summary.get("best_trial_id") == r["trial_id"] else "  "
        lines.append(f"{mark}{r['trial_id']:<10} {r['status']:<11} {r['epochs']:>6}  {_pct(r['val_acc']):>9}  "
                     f"{_pct(r['test_acc']):>10}  {describe_config(r['config'])}")
    failed = [r for r in rows if r["status"] in ("ERROR", "FAILED")]
    for r in failed:
        lines.append(f"  trial {r['trial_id']} failed: {r['failure'] or 'see its Ray logs'}")
    lines.append("")
    best = summary.get("best_config")
    if best is None:
        lines.append("  no trial ran every epoch: nothing to register")
    else:
        lines += [
            f"  best (by val acc)  {describe_config(best)} (effective n_ctx {summary.get('n_ctx_effective', '?')})",
            "                          acc %",
            f"    val   CoOp         {_pct(summary['val_acc'])}",
            f"    test  CoOp         {_pct(summary['test_acc'])}",
            f"    test  zero-shot    {_pct(summary['zeroshot_test_acc'])}",
            "",
            f"  registered         {summary['registered_model']} v{summary['registered_version']}; @champion -> "
            f"v{summary['champion_version']} ({summary['champion_reason']})" if summary.get("registered_version")
            else "  registered         nothing: a study measures, platform.tune registers"
            if not summary.get("register", True)
            else f"  registered         not yet: {summary['registered_model']} is registered when MLflow is back",
        ]
    if summary.get("tracking_error"):
        lines += ["", f"  MLflow failed: {summary['tracking_error']}",
                  f"  Every trial's results are kept under {summary['sweep_dir']}. Once the tracking server is back, "
                  "log them (and register the best trial) with:", f"    {summary['log_command']}"]
    lines += format_timing(summary.get("timing") or {})
    lines += [
        f"  MLflow sweep run   {summary['parent_run_id']}  (experiment {summary['experiment']!r}; best trial run "
        f"{summary.get('best_run_id') or '-'})",
        f"  open the UI        {summary['ui_command']}",
        f"  trials table       {summary.get('runs_url') or '-'}",
        f"  dashboards         {_dashboards_line(summary)}",
        f"  sweep folder       {summary['sweep_dir']}",
        f"  resume             {summary.get('resume_command') or '-'}",
    ]
    return "\n".join(lines)

