"""Sweep CoOp's prompt design with Ray Tune: ``python -m platform.tune --dataset eurosat``.

Each trial is one Ray Train run (``platform.train``): the Tune function trainable :func:`run_trial` builds a
``TorchTrainer`` and runs it with ``TuneReportCallback``, so every epoch's report reaches Tune (Ray Train V2's
Tune integration). Configurations come from the dataset's search space (``tune_spaces/<dataset>.py``), sampled by
Optuna's TPE (seeded); ASHA stops trials whose *validation* accuracy lags (``val_acc``, per epoch), first aborting
the trial's Ray Train run so its workers are freed (``GracefulASHA``, see ``platform/sweep_callbacks.py``). Test
accuracy is only measured, never used to choose.

Resources: the trial function itself reserves no CPU (only a little memory, so Tune can place it); its Ray Train
workers reserve ``--num-workers x --cpus-per-worker`` CPUs, and at most ``cluster CPUs // that`` trials run at once,
so a started trial never waits for workers that other trials hold.

Tracking (from this driver process only): the sweep is an MLflow parent run, each trial a child run
(``platform/sweep_callbacks.py``). At the end the best trial by validation accuracy is registered as a new version
of ``coop-<dataset>``; ``@champion`` moves to it only if it beats the champion (``platform/registry.py``).

``--resume`` finishes an interrupted sweep from its folder under ``--storage-path``: finished trials are kept,
unfinished and errored ones continue (from their last Ray Train checkpoint), the searcher's state is restored, and
the same MLflow runs are continued.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coop_core.datasets import DatasetNotFoundError

logger = logging.getLogger(__name__)

STATE_FILE = "coop_sweep.json"  # in the sweep folder: what --resume needs (parent run, base spec, tracking)
TRAIN_RUNS_DIR = "train_runs"  # in the sweep folder: one Ray Train run per trial, named by trial id
METRIC, MODE = "val_acc", "max"
TRIAL_MEMORY_BYTES = 256 * 1024**2  # the trial function's reservation: it waits on its trainer, no CPU needed
JSON_KEYS = ("best_config", "val_acc", "test_acc", "zeroshot_test_acc", "parent_run_id", "registered_model",
             "registered_version", "champion_version", "trials", "trials_completed", "trials_finished",
             "trials_early_stopped", "trials_errored", "best_trial_id", "best_run_id", "n_ctx_effective", "sweep_name",
             "sweep_dir", "tracking_uri", "experiment", "resumed", "wall_s", "timing")


# ----------------------------------------------------------------------------------------------------------------
# Search space and trials
# ----------------------------------------------------------------------------------------------------------------


def to_tune_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Tune domains for a ``tune_spaces`` space: ``Choice`` -> ``tune.choice``, ``LogUniform`` -> ``loguniform``."""
    from ray import tune

    from tune_spaces import Choice, LogUniform

    out: dict[str, Any] = {}
    for key, domain in space.items():
        if isinstance(domain, Choice):
            out[key] = tune.choice(list(domain.values))
        elif isinstance(domain, LogUniform):
            out[key] = tune.loguniform(domain.low, domain.high)
        else:
            raise ValueError(f"search-space value for {key!r} is not a tune_spaces domain: {domain!r}")
    return out


def run_trial(config: dict[str, Any], *, base_spec: dict[str, Any], train_storage: str, max_failures: int,
              log_level: str = "WARNING") -> None:
    """Tune function trainable: one Ray Train run of ``base_spec`` with the trial's searched values.

    The Train run is named by the trial id, so a trial restarted by ``--resume`` continues from its last checkpoint.
    Each epoch's report reaches Tune through :class:`~platform.sweep_callbacks.TrialReportCallback` (Ray Train V2's
    ``TuneReportCallback``); :class:`~platform.sweep_callbacks.TrialControllerCallback` lets ``GracefulASHA`` stop the
    run cleanly.
    """
    from platform.sweep_callbacks import TrialControllerCallback, TrialReportCallback, searched_overrides
    from platform.train import RunSpec, build_trainer

    import ray.tune

    spec = RunSpec.from_dict(base_spec).with_overrides(searched_overrides(config))
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(spec, storage_path=train_storage, name=trial_id, max_failures=max_failures,
                            run_config_callbacks=[TrialReportCallback(), TrialControllerCallback(trial_id)],
                            log_level=log_level)
    try:
        trainer.fit()
    except Exception:
        if _stopped_by_scheduler(trial_id):
            return  # ASHA stopped the trial: its Ray Train run was aborted on purpose
        raise


def _stopped_by_scheduler(trial_id: str) -> bool:
    from platform.sweep_callbacks import REGISTRY_NAME

    import ray

    try:
        return bool(ray.get(ray.get_actor(REGISTRY_NAME).was_stopped.remote(trial_id), timeout=30))
    except Exception:
        return False


def resolve_max_concurrent(requested: int | None, spec: Any, cluster: Mapping[str, float]) -> int:
    """Concurrent trials that fit the cluster at once: ``requested`` capped by CPUs (and GPUs) per trial.

    Raises:
        ValueError: not even one trial's workers fit the cluster.
    """
    per_trial_cpus = spec.num_workers * spec.cpus_per_worker
    fits = math.floor(cluster.get("CPU", 0) / per_trial_cpus + 1e-9)
    if spec.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / spec.num_workers + 1e-9))
    if fits < 1:
        raise ValueError(
            f"one trial needs {spec.num_workers} worker(s) x {spec.cpus_per_worker} CPU"
            f"{' + 1 GPU' if spec.use_gpu else ''} each, more than the Ray cluster has ({dict(cluster)}); "
            "lower --num-workers / --cpus-per-worker"
        )
    if requested is None:
        return fits
    if requested < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {requested}")
    if requested > fits:
        logger.warning("--max-concurrent %d lowered to %d: only %d trial(s) of %d worker(s) fit the cluster at once",
                       requested, fits, fits, spec.num_workers)
    return min(requested, fits)


# ----------------------------------------------------------------------------------------------------------------
# Sweep state (for --resume)
# ----------------------------------------------------------------------------------------------------------------


def _sweep_dir(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def write_state(sweep_dir: str, state: Mapping[str, Any]) -> None:
    """Write the sweep's state file atomically (a local folder)."""
    path = Path(sweep_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_state(sweep_dir: str) -> dict[str, Any] | None:
    path = Path(sweep_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def latest_sweep(storage_path: str, dataset: str) -> str | None:
    """The name of the most recently started sweep of ``dataset`` under ``storage_path``."""
    root = Path(storage_path)
    found = []
    for state_file in root.glob(f"*/{STATE_FILE}"):
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            continue
        if state.get("dataset") == dataset:
            found.append((state.get("started_at", 0.0), state_file.parent.name))
    return max(found)[1] if found else None


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def trial_rows(grid: Any, epochs: int) -> list[dict[str, Any]]:
    """One summary row per trial of a ResultGrid (status, epochs reached, metrics, config, timings)."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "ERROR" if result.error is not None else "TERMINATED"
        rows.append({
            "trial_id": m.get("trial_id") or Path(result.path).name,
            "status": status,
            "epochs": int(m.get("epoch", 0)),
            "finished": status == "TERMINATED" and int(m.get("epoch", 0)) >= epochs and "test_acc" in m,
            "config": dict(result.config or {}),
            "val_acc": m.get("val_acc"),
            "test_acc": m.get("test_acc"),
            "zeroshot_test_acc": m.get("zeroshot_test_acc"),
            "checkpoint_path": m.get("checkpoint_path"),
            "time_total_s": m.get("time_total_s"),
            "train_loop_s": m.get("train_loop_s"),
            "setup_s": m.get("setup_s"),
            "last_result": m,
        })
    return rows


def pick_best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The trial with the highest final validation accuracy among those that ran every epoch.

    Early-stopped trials have no final prompts or test accuracy, so they are never chosen; ties go to the earlier
    trial. Test accuracy plays no part.
    """
    candidates = [r for r in rows if r["finished"] and r["val_acc"] is not None and r["checkpoint_path"]]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r["val_acc"], -rows.index(r)))


def _pct(value: Any) -> str:
    return f"{value:6.2f}" if isinstance(value, (int, float)) else "     -"


def format_report(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The human-readable end-of-sweep report: trials, best configuration beside zero-shot, where to look."""
    from platform.sweep_callbacks import describe_config

    lines = ["", f"Sweep {summary['sweep_name']} on {summary['dataset']}: {summary['trials']} trials "
                 f"({summary['trials_finished']} ran all {summary['epochs']} epochs, {summary['trials_early_stopped']} "
                 f"stopped early by ASHA, {summary['trials_errored']} errored) in {summary['wall_s']:.0f}s", ""]
    lines.append("  trial      status      epochs  val acc %  test acc %  config")
    for r in sorted(rows, key=lambda r: (r["val_acc"] is None, -(r["val_acc"] or 0.0))):
        mark = " *" if summary.get("best_trial_id") == r["trial_id"] else "  "
        lines.append(f"{mark}{r['trial_id']:<10} {r['status']:<11} {r['epochs']:>6}  {_pct(r['val_acc']):>9}  "
                     f"{_pct(r['test_acc']):>10}  {describe_config(r['config'])}")
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
            f"v{summary['champion_version']} ({summary['champion_reason']})",
        ]
    lines += [
        f"  MLflow sweep run   {summary['parent_run_id']}  (experiment {summary['experiment']!r}; best trial run "
        f"{summary.get('best_run_id') or '-'})",
        f"  open the UI        {summary['ui_command']}",
        f"  sweep folder       {summary['sweep_dir']}  (resume: add --resume --sweep-name {summary['sweep_name']})",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from platform.train import add_infra_arguments, add_run_arguments

    parser = argparse.ArgumentParser(
        prog="python -m platform.tune",
        description="Sweep CoOp's prompt design (context length and initialisation, class-token position, "
                    "class-specific context, learning rate) with Ray Tune: Optuna TPE proposes, ASHA stops trials "
                    "that lag on validation accuracy, each trial is a Ray Train run. Trials are MLflow child runs of "
                    "the sweep's run; the best trial by validation accuracy is registered as coop-<dataset>.",
        epilog="The searched fields (tune_spaces/<dataset>.py) override the matching flags below; the other flags set "
               "every trial.\n"
               "Example (offline, tiny backbone): python -m platform.tune --dataset eurosat --data-root ../shared/data "
               "--backbone tests/fixtures/tiny-vit.json --pretrained none --shots 2 --epochs 3 --num-samples 8\n"
               "Resume after an interruption: the same command with --resume (and --sweep-name NAME, default: the "
               "latest sweep of the dataset).\n"
               "Then: mlflow ui --backend-store-uri sqlite:///mlflow.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--num-samples", type=int, default=16, help="trials to run (default: 16)")
    sweep.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default and cap: as many as the cluster's CPUs/GPUs fit)")
    sweep.add_argument("--workers-per-trial", type=int, dest="num_workers", default=argparse.SUPPRESS,
                       help="Ray Train workers per trial (same as --num-workers)")
    sweep.add_argument("--fixed", nargs="+", default=[], metavar="FIELD",
                       help="searched fields to hold at their flag value instead, e.g. --fixed train.lr "
                            "prompt.ctx_init (with --lr 1e-4 --ctx-init '')")
    sweep.add_argument("--search-seed", type=int, default=None,
                       help="seed of Optuna's TPE sampler (default: --seed); --seed itself seeds the few-shot split "
                            "and context initialisation of every trial")
    sweep.add_argument("--grace-period", type=int, default=1,
                       help="epochs every trial runs before ASHA may stop it (default: 1)")
    sweep.add_argument("--reduction-factor", type=float, default=2.0,
                       help="ASHA keeps the top 1/factor of trials at each rung (default: 2)")
    sweep.add_argument("--sweep-name", default=None,
                       help="folder of the sweep under --storage-path (default: sweep-<dataset>-<time>)")
    sweep.add_argument("--resume", action="store_true",
                       help="finish the interrupted sweep --sweep-name (default: the latest of --dataset) without "
                            "re-running finished trials; uses the sweep's saved configuration")
    sweep.add_argument("--max-failures", type=int, default=2,
                       help="worker failures per trial to recover from at the last checkpoint (default: 2)")
    add_infra_arguments(parser)
    return parser


def _configure_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("platform", "coop_core", __name__):
        logging.getLogger(name).setLevel(logging.INFO)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 no trial finished, 2 bad input / data / weights)."""
    from coop_core.backbone import WeightsUnavailableError
    from tune_spaces import get_space

    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    t0 = time.perf_counter()
    storage_path = args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())

    from platform.train import (
        RunSpec,
        check_inputs,
        hub_unreachable_use_cache,
        init_ray,
        resolve_use_gpu,
        spec_from_args,
    )

    state = None
    if args.resume:
        name = args.sweep_name or latest_sweep(storage_path, args.dataset)
        if name is None:
            return _fail(f"--resume: no sweep of {args.dataset!r} under {storage_path} (pass --sweep-name)")
        state = read_state(_sweep_dir(storage_path, name))
        if state is None:
            return _fail(f"--resume: {_sweep_dir(storage_path, name)}/{STATE_FILE} not found; is this a sweep folder?")
        args.sweep_name = name
    name = args.sweep_name or f"sweep-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = _sweep_dir(storage_path, name)
    try:
        space = get_space(args.dataset)
        unknown = sorted(set(args.fixed) - set(space))
        if unknown:
            raise ValueError(f"--fixed {' '.join(unknown)}: not searched for {args.dataset}; "
                             f"searched fields: {', '.join(space)}")
        space = {k: v for k, v in space.items() if k not in args.fixed}
        if state is not None:
            spec = RunSpec.from_dict(state["base_spec"])
        else:
            spec = spec_from_args(args, use_gpu=args.use_gpu != "no")
            if args.num_samples < 1:
                raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        offline = hub_unreachable_use_cache(spec)
        check_inputs(spec)
    except (DatasetNotFoundError, WeightsUnavailableError, ValueError, FileNotFoundError) as err:
        return _fail(str(err))

    from platform.sweep_callbacks import REGISTRY_NAME, MlflowSweepCallback, TrialControllersActor

    import ray

    started_ray = init_ray(args.ray_address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}} if offline else None)
    try:
        if state is None:
            use_gpu = resolve_use_gpu(args.use_gpu)
            if args.use_gpu == "yes" and not resolve_use_gpu("auto"):
                raise ValueError("--use-gpu yes, but the Ray cluster has no GPUs; use --use-gpu no or auto")
            spec = dataclasses.replace(spec, use_gpu=use_gpu)
        max_concurrent = resolve_max_concurrent(args.max_concurrent, spec, ray.cluster_resources())
    except ValueError as err:
        return _fail(str(err))
    epochs = spec.train.resolved_epochs

    if state is None:
        state = open_sweep(args, spec, space, name, sweep_dir, max_concurrent)
    else:
        from mlflow.tracking import MlflowClient

        MlflowClient(state["tracking_uri"]).update_run(state["parent_run_id"], status="RUNNING")
    resumed = args.resume
    logger.info("sweep %s: %d trials of %s, %d at once; MLflow run %s (%s)", name, state["num_samples"],
                spec.dataset, max_concurrent, state["parent_run_id"], state["tracking_uri"])

    callback = MlflowSweepCallback(parent_run_id=state["parent_run_id"], experiment=state["experiment"],
                                   tracking_uri=state["tracking_uri"], base_spec=spec.to_dict(),
                                   storage_path=storage_path, epochs=epochs, sweep_name=name)
    tuner = build_tuner(args, spec, space, state, name, storage_path, sweep_dir, max_concurrent, callback,
                        restore=resumed)
    registry = TrialControllersActor.options(name=REGISTRY_NAME, get_if_exists=True).remote()
    grid = tuner.fit()
    logger.info("trial controllers: %s", ray.get(registry.stats.remote()))

    rows = trial_rows(grid, epochs)
    callback.setup()
    for row in rows:  # runs of trials that finished while no driver was watching
        run = callback.child_runs().get(row["trial_id"])
        if row["status"] == "TERMINATED" and (run is None or run.info.status != "FINISHED"):
            callback.finish_from_result(row["trial_id"], row["config"], row["last_result"])
    summary = summarise(rows, spec, state, name, sweep_dir, resumed)
    best = pick_best(rows)
    if best is not None:
        summary.update(register_best(best, callback, state, name, storage_path))
    summary["wall_s"] = time.perf_counter() - t0
    summary["timing"] = timing(rows, summary["wall_s"])
    close_sweep(summary, state)
    if started_ray:
        ray.shutdown()  # stops forwarding worker logs, so nothing can follow the report and the JSON line on stdout

    print(format_report(summary, rows))
    if args.json:
        print(json.dumps({k: summary.get(k) for k in JSON_KEYS}, sort_keys=True))
    return 0 if best is not None else 1


def open_sweep(args: argparse.Namespace, spec: Any, space: Mapping[str, Any], name: str, sweep_dir: str,
               max_concurrent: int) -> dict[str, Any]:
    """Start the sweep's MLflow parent run (base config and sweep settings as params) and write its state file."""
    from platform import tracking

    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    experiment = args.experiment or tracking.default_experiment(spec.dataset)
    epochs = spec.train.resolved_epochs
    parent_run_id = tracking.create_run(experiment, run_name=name, tracking_uri=tracking_uri,
                                        tags={"coop.entry_point": "platform.tune", "coop.sweep": name,
                                              "coop.sweep_dir": sweep_dir})
    search_seed = spec.train.seed if args.search_seed is None else args.search_seed
    sweep_params = {"sweep.num_samples": args.num_samples, "sweep.max_concurrent": max_concurrent,
                    "sweep.search_seed": search_seed, "sweep.searcher": "optuna-tpe",
                    "sweep.scheduler": f"asha(metric={METRIC}, grace={args.grace_period}, "
                                       f"rf={args.reduction_factor}, max_t={epochs})",
                    "sweep.space": json.dumps({k: repr(v) for k, v in space.items()}),
                    "sweep.fixed": " ".join(args.fixed) or "-"}
    tracking.log_params(parent_run_id, tracking.flatten_params(spec) | sweep_params, tracking_uri=tracking_uri)
    state = {"dataset": spec.dataset, "base_spec": spec.to_dict(), "parent_run_id": parent_run_id,
             "tracking_uri": tracking_uri, "experiment": experiment, "started_at": time.time(),
             "num_samples": args.num_samples, "search_seed": search_seed, "epochs": epochs}
    if "://" not in sweep_dir:
        write_state(sweep_dir, state)
    return state


def build_tuner(args: argparse.Namespace, spec: Any, space: Mapping[str, Any], state: Mapping[str, Any], name: str,
                storage_path: str, sweep_dir: str, max_concurrent: int, callback: Any, *, restore: bool) -> Any:
    """The Tuner: restored from ``sweep_dir`` (searcher, scheduler, trial states) or new (Optuna TPE + ASHA)."""
    from platform.sweep_callbacks import GracefulASHA

    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_spec=spec.to_dict(), train_storage=f"{sweep_dir}/{TRAIN_RUNS_DIR}",
                             max_failures=args.max_failures, log_level="INFO" if args.verbose else "WARNING"),
        {"cpu": 0, "memory": TRIAL_MEMORY_BYTES},
    )
    if restore and tune.Tuner.can_restore(sweep_dir):
        logger.info("resuming sweep %s from %s", name, sweep_dir)
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    epochs = spec.train.resolved_epochs
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=state["search_seed"])),
            scheduler=GracefulASHA(time_attr="epoch", max_t=epochs, grace_period=min(args.grace_period, epochs),
                                   reduction_factor=args.reduction_factor),
            num_samples=state["num_samples"],
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=[callback], verbose=0),
    )


def summarise(rows: Sequence[Mapping[str, Any]], spec: Any, state: Mapping[str, Any], name: str, sweep_dir: str,
              resumed: bool) -> dict[str, Any]:
    """The sweep's outcome before registration (trial counts, where things are)."""
    from platform import tracking
    from platform.registry import registered_model_name

    return {
        "sweep_name": name, "sweep_dir": sweep_dir, "dataset": spec.dataset, "epochs": spec.train.resolved_epochs,
        "backbone": spec.model.backbone, "shots": spec.train.shots, "seed": spec.train.seed,
        "trials": len(rows), "trials_completed": sum(r["status"] == "TERMINATED" for r in rows),
        "trials_finished": sum(r["finished"] for r in rows),
        "trials_early_stopped": sum(r["status"] == "TERMINATED" and not r["finished"] for r in rows),
        "trials_errored": sum(r["status"] == "ERROR" for r in rows),
        "parent_run_id": state["parent_run_id"], "experiment": state["experiment"],
        "tracking_uri": state["tracking_uri"], "ui_command": tracking.ui_command(state["tracking_uri"]),
        "resumed": resumed, "best_config": None, "best_trial_id": None, "best_run_id": None, "val_acc": None,
        "test_acc": None, "zeroshot_test_acc": None, "registered_model": registered_model_name(spec.dataset),
        "registered_version": None, "champion_version": None, "champion_reason": None,
    }


def register_best(best: Mapping[str, Any], callback: Any, state: Mapping[str, Any], name: str,
                  storage_path: str) -> dict[str, Any]:
    """Register the best trial's final prompts (``platform.registry``); the summary fields it adds."""
    from platform.registry import register_prompt
    from platform.sweep_callbacks import checkpoint_dir, searched_overrides

    best_run_id = callback.run_for(best["trial_id"], best["config"])
    with checkpoint_dir(best["checkpoint_path"], storage_path) as d:
        resolved = json.loads((d / "config.json").read_text())
        registration = register_prompt(
            d, resolved, best["last_result"], run_id=best_run_id, tracking_uri=state["tracking_uri"],
            extra_tags={"sweep_run_id": state["parent_run_id"], "trial_id": best["trial_id"], "sweep": name},
        )
    return {
        "best_config": searched_overrides(best["config"]), "best_trial_id": best["trial_id"],
        "best_run_id": best_run_id, "val_acc": best["val_acc"], "test_acc": best["test_acc"],
        "zeroshot_test_acc": best["zeroshot_test_acc"], "n_ctx_effective": resolved.get("n_ctx_effective"),
        "registered_version": registration.version, "champion_version": registration.champion_version,
        "champion_reason": registration.reason,
    }


def timing(rows: Sequence[Mapping[str, Any]], wall_s: float) -> dict[str, float | None]:
    """Throughput and where a trial's time goes (Tune's trial time vs the training loop inside it)."""
    loops = [r["train_loop_s"] for r in rows if r["train_loop_s"] is not None]
    totals = [r["time_total_s"] for r in rows if r["time_total_s"] is not None and r["finished"]]
    return {
        "trials_per_hour": 3600.0 * len(rows) / wall_s if wall_s > 0 else None,
        "mean_trial_s": sum(totals) / len(totals) if totals else None,
        "mean_train_loop_s": sum(loops) / len(loops) if loops else None,
    }


def close_sweep(summary: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Log the sweep's outcome on the parent run and end it (FINISHED, or FAILED when no trial finished)."""
    from platform import tracking

    from mlflow.tracking import MlflowClient

    uri, parent = state["tracking_uri"], state["parent_run_id"]
    final = {f"best_{k}": summary[k] for k in ("val_acc", "test_acc", "zeroshot_test_acc") if summary[k] is not None}
    final |= {"trials_completed": summary["trials_completed"], "trials_errored": summary["trials_errored"],
              "sweep_wall_s": summary["wall_s"]}
    tracking.log_final_metrics(parent, final, tracking_uri=uri)
    client = MlflowClient(uri)
    if summary["best_trial_id"] is not None:
        client.set_tag(parent, "coop.best_trial_id", summary["best_trial_id"])
        client.set_tag(parent, "coop.registered_version", str(summary["registered_version"]))
    tracking.end_run(parent, "FINISHED" if summary["best_trial_id"] is not None else "FAILED", tracking_uri=uri)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray then pickles run_trial by reference
    # (platform.tune.run_trial) and log records carry the "platform.tune" logger name.
    from platform.tune import main as _main

    sys.exit(_main())
