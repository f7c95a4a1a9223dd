"""``run_sweep``: the checks before Ray starts, Ray's start-up, the Tuner's run and what follows it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from platform.progress import ConsoleProgress, TrialBar, bars_wanted
from platform.run_spec import RunSpec
from platform.sweep.interrupt import SweepInterrupt, interrupted
from platform.sweep.outcome import best_trial_summary, pick_best, register_best, summarise, trial_rows
from platform.sweep.parent_run import close_sweep, close_unclosed_runs, draw_dashboards, open_sweep
from platform.sweep.plan import (
    METRIC,
    InfraSettings,
    SweepPlan,
    SweepSettings,
    grid_epochs,
    parse_grid,
    prompt_candidates,
    resolve_max_concurrent,
    resolve_trial_runner,
    shot_candidates,
    validate_gpus_per_trial,
)
from platform.sweep.report import JSON_KEYS, format_report
from platform.sweep.state import SWEEP_STATE_FILE, latest_sweep, read_sweep_state, resume_command, sweep_folder
from platform.sweep.timing import timing
from platform.sweep.tuner import build_tuner
from platform.tracking_store import limit_http_retries

logger = logging.getLogger(__name__)


BAR_LABELS = {"features": "image features"}


def run_sweep(spec: RunSpec, settings: SweepSettings, infra: InfraSettings, plan: SweepPlan = SweepPlan()) -> int:
    """Run the sweep of ``spec`` (every trial's base run) that ``settings``, ``infra`` and ``plan`` describe; returns
    the exit status (0 ok, 1 no trial finished or MLflow failed, 2 bad input, 130 interrupted).

    With ``settings.resume`` the sweep's saved state replaces ``spec`` and the settings it was started with."""
    from platform import tracking
    from platform.cli import configure_logging, fail
    from platform.launch import INPUT_ERRORS, check_before_ray, resolve_gpus, start_ray, warn_unshared_paths

    from coop_core.datasets import get_dataset_spec
    from tune_spaces import space_for

    configure_logging(infra.verbose)
    limit_http_retries()
    t0 = time.perf_counter()
    storage_path = infra.resolved_storage_path
    ref = spec.data_ref

    state = None
    name = settings.name
    if settings.resume:
        name = name or latest_sweep(storage_path, ref.name, plan.kind)
        if name is None:
            return fail(f"--resume: no sweep of {ref.name!r} under {storage_path} (pass --sweep-name)")
        state = read_sweep_state(sweep_folder(storage_path, name))
        if state is None:
            return fail(f"--resume: {sweep_folder(storage_path, name)}/{SWEEP_STATE_FILE} not found; "
                        "is this a sweep folder?")
    name = name or f"{plan.kind}-{ref.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = sweep_folder(storage_path, name)
    try:
        template = ref.source.template if ref.source is not None else get_dataset_spec(ref.name).template
        space = space_for(ref.name, template) if plan.search else {}
        unknown = sorted(set(settings.fixed) - set(space))
        if unknown:
            raise ValueError(f"--fixed {' '.join(unknown)}: not searched for {ref.name}; "
                             f"searched fields: {', '.join(space)}")
        space = {k: v for k, v in space.items() if k not in settings.fixed}
        if state is not None:
            spec = RunSpec.from_dict(state["base_spec"])
            runner = state["trial_runner"]
            grid = state["grid"]
        else:
            spec = dataclasses.replace(spec, eval_targets=plan.eval_targets)
            grid = parse_grid(settings.grid, spec)
            if grid:
                space = {}  # a grid sweep searches nothing else
            runner = resolve_trial_runner(settings.trial_runner, spec)
        tracking_uri = state["tracking_uri"] if state is not None else tracking.resolve_tracking_uri(infra.tracking_uri)
        checked = check_before_ray(spec, tracking_uri=tracking_uri, storage_path=storage_path,
                                   prompts=prompt_candidates(spec, space, grid), shots=shot_candidates(spec, grid))
    except INPUT_ERRORS as err:
        return fail(str(err))

    from platform.sweep_tracking import MlflowSweepCallback, error_line

    import ray

    started_ray = start_ray(infra.ray_address, verbose=infra.verbose, offline=checked.offline)
    try:
        if state is None:
            spec = resolve_gpus(spec, infra.use_gpu)
            gpus_per_trial = validate_gpus_per_trial(settings.gpus_per_trial, spec, runner)
        else:
            gpus_per_trial = state["gpus_per_trial"]
        max_concurrent = resolve_max_concurrent(settings.max_concurrent, spec, ray.cluster_resources(),
                                                gpus_per_trial)
        warn_unshared_paths(checked.splits, spec, storage_path)
    except ValueError as err:
        return fail(str(err))
    epochs = grid_epochs(spec, grid)

    try:
        if state is None:
            state = open_sweep(settings, infra, spec, space, grid, name, sweep_dir, max_concurrent, runner,
                               gpus_per_trial, plan)
        else:
            from mlflow.tracking import MlflowClient

            MlflowClient(state["tracking_uri"]).update_run(state["parent_run_id"], status="RUNNING")
    except Exception as err:  # the store passed the probe a moment ago and failed now: nothing has run yet
        return fail(f"MLflow tracking failed before the sweep started ({error_line(err)}); nothing was trained, "
                    "run the command again once the tracking store works")
    resumed = settings.resume
    n_trials = state["num_samples"] * math.prod(len(v) for v in (state.get("grid") or {}).values())
    logger.info("%s %s: %d trials of %s, %d at once (%s trials); MLflow run %s (%s)", plan.kind, name, n_trials,
                spec.data_ref.label, max_concurrent, state["trial_runner"], state["parent_run_id"],
                state["tracking_uri"])

    callback = MlflowSweepCallback(parent_run_id=state["parent_run_id"], experiment=state["experiment"],
                                   tracking_uri=state["tracking_uri"], base_spec=spec.to_dict(),
                                   storage_path=storage_path, epochs=epochs, sweep_name=name,
                                   resume_command=resume_command(state, name, storage_path))
    bars = ConsoleProgress(bars_wanted(json_output=infra.json, verbose=infra.verbose), labels=BAR_LABELS)
    with bars:
        trial_bar = TrialBar(bars, n_trials, epochs, METRIC)
        tuner = build_tuner(settings, infra.verbose, spec, space, state, name, storage_path, sweep_dir, max_concurrent,
                            [callback, trial_bar], restore=resumed, progress_board=bars.board)
        controllers = None
        if state["trial_runner"] == "ray-train":
            from platform.trial_stopping import CONTROLLERS_ACTOR_NAME, TrialControllersActor

            controllers = TrialControllersActor.options(name=CONTROLLERS_ACTOR_NAME, get_if_exists=True).remote()
        with SweepInterrupt(callback) as interrupt:
            grid = tuner.fit()
    if controllers is not None:
        logger.info("trial controllers: %s", ray.get(controllers.stats.remote()))
        ray.kill(controllers)  # the sweep is over: nothing is left to stop or reap

    rows = trial_rows(grid, epochs)
    summary = summarise(rows, spec, state, name, sweep_dir, resumed)
    summary["resume_command"] = callback.resume_command
    if interrupt.requested:  # Ctrl-C: Tune stopped the trials and saved its state, fit() returned early
        return interrupted(callback, summary, state, started_ray)
    best = pick_best(rows)
    # Everything below writes to MLflow. If the server went away, the trials' results stay in their checkpoints and
    # the report says which command logs them (and registers the best trial, once) when it is back.
    tracking_error = None
    try:
        callback.setup()
        close_unclosed_runs(callback, rows)
        if best is not None and state.get("register", True):
            summary.update(register_best(best, callback, state, name, storage_path))
        elif best is not None:
            summary.update(best_trial_summary(best, callback))
    except Exception as err:  # whatever the store raises; the sweep's results are safe on disk
        tracking_error = error_line(err)
    summary["wall_s"] = time.perf_counter() - t0
    summary["timing"] = timing(callback.timings, len(rows), summary["wall_s"], callback.windows)
    if tracking_error is None:
        try:
            if plan.finish is not None:
                summary.update(plan.finish(summary, rows, state))
            close_sweep(summary, state)
            summary["dashboards"] = draw_dashboards(state, sweep_dir)
        except Exception as err:
            tracking_error = error_line(err)
    summary.update(tracking_complete=tracking_error is None, tracking_error=tracking_error,
                   log_command=None if tracking_error is None else callback.log_command())
    if started_ray:
        ray.shutdown()  # stops forwarding worker logs, so nothing can follow the report and the JSON line on stdout

    print(format_report(summary, rows))
    if plan.report is not None and tracking_error is None:
        print(plan.report(summary))
    if infra.json:
        print(json.dumps({k: summary.get(k) for k in (*JSON_KEYS, *plan.json_keys)}, sort_keys=True))
    return 0 if best is not None and tracking_error is None else 1
