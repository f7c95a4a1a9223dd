"""Where a sweep's time went: throughput and the per-phase medians and totals over its trials."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

TIMING_ROWS = (("queue wait", "time_queue_s"), ("process start-up", "time_process_start_s"),
               ("model load", "time_model_s"), ("features", "time_features_s"),
               ("training loop", "time_train_loop_s"), ("evaluation", "time_eval_s"),
               ("checkpoint + report", "time_report_s"), ("MLflow logging", "time_tracking_s"),
               ("trial wall", "time_trial_wall_s"), ("overhead", "time_overhead_s"))


def timing(trial_timings: Mapping[str, Mapping[str, float]], n_trials: int, wall_s: float,
           windows: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Throughput and where the trials' time went: the median and total of each phase over the trials that ended
    while this driver watched, and the overhead's share of the trials' wall time.

    Two rates: ``trials_per_hour`` over the whole command (Ray start-up, registration and all), and
    ``trials_per_hour_running`` over the window from the first trial's creation to the last one's end — the rate a
    long sweep settles at, once the sweep's fixed start and finish are spread over many trials.
    """
    out: dict[str, Any] = {"trials_per_hour": 3600.0 * n_trials / wall_s if wall_s > 0 else None,
                           "trials_timed": len(trial_timings)}
    spans = list((windows or {}).values())
    window = max(end for _, end in spans) - min(start for start, _ in spans) if spans else None
    out["trials_window_s"] = window
    out["trials_per_hour_running"] = 3600.0 * len(spans) / window if window else None
    for _, key in TIMING_ROWS:
        values = [t[key] for t in trial_timings.values() if key in t]
        out[f"median_{key}"] = statistics.median(values) if values else None
        out[f"total_{key}"] = sum(values) if values else None
    walls, overheads = out["total_time_trial_wall_s"], out["total_time_overhead_s"]
    out["overhead_share"] = overheads / walls if walls and overheads is not None else None
    return out


def format_timing(t: Mapping[str, Any]) -> list[str]:
    """The report's "where the time went" table (empty when no trial was timed)."""
    if not t.get("trials_timed"):
        return []
    running = t.get("trials_per_hour_running")
    rate = f"{t['trials_per_hour']:.0f} trials/hour overall" + (f", {running:.0f} while trials ran" if running else "")
    lines = ["", f"  where the time went ({t['trials_timed']} trials; {rate})",
             "    phase                 median s/trial   total s"]
    for label, key in TIMING_ROWS:
        median, total = t.get(f"median_{key}"), t.get(f"total_{key}")
        if median is not None:
            lines.append(f"    {label:<20}  {median:>14.2f}  {total:>8.1f}")
    if t.get("overhead_share") is not None:
        lines.append(f"    overhead share (wall minus training loop and evaluation): {100 * t['overhead_share']:.1f} %")
    lines.append("")
    return lines
