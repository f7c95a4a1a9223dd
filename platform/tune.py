"""Sweep CoOp's prompt design with Ray Tune: ``python -m platform.tune --dataset eurosat``.

Configurations come from the dataset's search space (``tune_spaces/<dataset>.py``), sampled by Optuna's TPE
(seeded); ASHA stops trials whose *validation* accuracy lags (``val_acc``, per epoch). Test accuracy is only
measured, never used to choose.

Which path a trial takes (``platform/trials.py``; ``--trial-runner`` overrides):

- one worker per trial (the default): the trial runs CoOp in its own Tune actor — no Ray Train run, no controller,
  worker group or process group per trial — and Tune reuses the actor for the next trial (``reuse_actors``), whose
  warm cache still holds CLIP and the features (``platform/process_cache.py``). A trial reserves
  ``--cpus-per-worker`` CPUs and, on GPUs, ``--gpus-per-trial`` of a GPU (several trials can share one).
- ``--workers-per-trial N > 1``: each trial is one Ray Train run of N DDP workers, like ``platform.train``. The trial
  function itself reserves no CPU (its workers do); ASHA stops such trials through ``platform/trial_stopping.py`` so
  their workers and placement groups are released.

At most ``cluster CPUs // CPUs per trial`` trials (and as many as the GPUs fit) run at once, so a started trial never
waits for resources that other trials hold.

Tracking (from this driver process only): the sweep is an MLflow parent run, each trial a child run
(``platform/sweep_tracking.py``), with where each trial's time went. At the end the best trial by validation accuracy
is registered as a new version of ``coop-<dataset>``; ``@champion`` moves to it only if it beats the champion
(``platform/registry.py``).

``--resume`` finishes an interrupted sweep from its folder under ``--storage-path``: finished trials are kept,
unfinished and errored ones continue from their last checkpoint, the searcher's state is restored, and the same
MLflow runs are continued.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform.artifacts import ACCURACY_KEYS, DASHBOARDS_ARTIFACT_DIR, EPOCHS_TOTAL_KEY, FAILURE_KEY, SELECTION_METRIC
from platform.progress import ConsoleProgress, TrialBar, bars_wanted
from typing import Any

logger = logging.getLogger(__name__)

SWEEP_STATE_FILE = "coop_sweep.json"  # in the sweep folder: what --resume needs (parent run, base spec, tracking)
TRAIN_RUNS_DIR = "train_runs"  # in the sweep folder: one Ray Train run per multi-worker trial, named by trial id
METRIC, MODE = SELECTION_METRIC, "max"
BAR_LABELS = {"features": "image features"}
TRIAL_MEMORY_BYTES = 256 * 1024**2  # a multi-worker trial's own reservation: it waits on its trainer, no CPU needed
TRIAL_RUNNERS = ("auto", "in-process", "ray-train")
JSON_KEYS = ("best_config", "val_acc", "test_acc", "zeroshot_test_acc", "parent_run_id", "registered_model",
             "registered_version", "champion_version", "trials", "trials_completed", "trials_finished",
             "trials_early_stopped", "trials_errored", "best_trial_id", "best_run_id", "n_ctx_effective", "sweep_name",
             "sweep_dir", "tracking_uri", "experiment", "resumed", "wall_s", "timing", "trial_runner", "runs_url",
             "dashboards", "tracking_complete", "tracking_error", "log_command")


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


def parse_grid(items: Sequence[str], spec: Any) -> dict[str, list[Any]]:
    """``["prompt.n_ctx=4,8", "prompt.csc=true,false"]`` -> ``{"prompt.n_ctx": [4, 8], "prompt.csc": [True, False]}``.

    Values take the type of the field in ``spec`` (int, float, bool as true/false, or text; ``train.epochs`` is an
    int) and each one is validated by the configs.

    Raises:
        ValueError: a malformed item, an unknown field, a repeated field, or a value the configs reject.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        section, _, name = field.partition(".")
        if not sep or section not in ("prompt", "train") or not name or not raw:
            raise ValueError(f"--grid {item!r}: expected FIELD=V1,V2,... with FIELD prompt.<name> or train.<name>")
        config = getattr(spec, section)
        if not hasattr(config, name):
            raise ValueError(f"--grid {item!r}: {section} has no field {name!r}")
        if field in grid:
            raise ValueError(f"--grid {field} is given twice")
        current = getattr(config, name)
        kind = int if current is None else type(current)
        values = []
        for text in raw.split(","):
            text = text.strip()
            try:
                if kind is bool:
                    if text.lower() not in ("true", "false"):
                        raise ValueError(text)
                    value: Any = text.lower() == "true"
                else:
                    value = kind(text)
            except ValueError:
                raise ValueError(f"--grid {field}: {text!r} is not a valid {kind.__name__}") from None
            spec.with_overrides({field: value})  # the configs validate it
            values.append(value)
        if len(set(values)) != len(values):
            raise ValueError(f"--grid {field}: repeated values in {raw!r}")
        grid[field] = values
    return grid


def prompt_candidates(spec: Any, space: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None
                      ) -> list[tuple[int, str]]:
    """Every ``(n_ctx, ctx_init)`` a trial of the sweep may train: the grid's or the space's values, else the flag's.

    The prompt's length depends on nothing else, so checking these before Ray starts proves every trial's prompt fits.
    """
    from tune_spaces import Choice

    def values(field: str, default: Any) -> list[Any]:
        if grid and field in grid:
            return list(grid[field])
        domain = space.get(field)
        return list(domain.values) if isinstance(domain, Choice) else [default]

    return [(n, init) for n in values("prompt.n_ctx", spec.prompt.n_ctx)
            for init in values("prompt.ctx_init", spec.prompt.ctx_init)]


def resolve_trial_runner(requested: str, spec: Any) -> str:
    """``in-process`` for single-worker trials and ``ray-train`` for DDP trials, unless ``requested`` says otherwise.

    Raises:
        ValueError: an unknown runner, or ``in-process`` for a trial of several workers.
    """
    if requested not in TRIAL_RUNNERS:
        raise ValueError(f"--trial-runner must be one of {', '.join(TRIAL_RUNNERS)}, got {requested!r}")
    if requested == "auto":
        return "in-process" if spec.num_workers == 1 else "ray-train"
    if requested == "in-process" and spec.num_workers > 1:
        raise ValueError(f"--trial-runner in-process runs one worker per trial; --workers-per-trial "
                         f"{spec.num_workers} needs ray-train (or auto)")
    return requested


def validate_gpus_per_trial(value: float, spec: Any, runner: str) -> float:
    """The GPU share of a trial: a fraction in (0, 1] for single-worker trials, 1 for DDP trials (ignored on CPUs).

    Several single-worker trials may share a GPU (0.25: four at once): one CoOp trial on cached features leaves a
    modern GPU mostly idle. DDP trials need a whole GPU per worker: NCCL refuses two ranks on one device.

    Raises:
        ValueError: outside (0, 1], or a fraction for a multi-worker trial.
    """
    if not spec.use_gpu:
        return 0.0
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"--gpus-per-trial must be in (0, 1] (a share of one GPU per trial), got {value}")
    if runner == "ray-train" and value != 1:
        raise ValueError(f"--gpus-per-trial {value}: trials of several DDP workers take one whole GPU per worker "
                         "(NCCL cannot place two ranks on one GPU); use 1, or one worker per trial")
    return float(value)


def resolve_max_concurrent(requested: int | None, spec: Any, cluster: Mapping[str, float],
                           gpus_per_trial: float = 1.0) -> int:
    """Concurrent trials that fit the cluster at once: ``requested`` capped by CPUs (and GPUs) per trial.

    Raises:
        ValueError: not even one trial fits the cluster.
    """
    per_trial_cpus = spec.num_workers * spec.cpus_per_worker
    fits = math.floor(cluster.get("CPU", 0) / per_trial_cpus + 1e-9)
    per_trial_gpus = spec.num_workers * gpus_per_trial if spec.use_gpu else 0.0
    if spec.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / per_trial_gpus + 1e-9))
    if fits < 1:
        raise ValueError(
            f"one trial needs {spec.num_workers} worker(s) x {spec.cpus_per_worker} CPU"
            f"{f' + {per_trial_gpus:g} GPU in all' if spec.use_gpu else ''}, more than the Ray cluster has "
            f"({dict(cluster)}); lower --workers-per-trial / --cpus-per-worker / --gpus-per-trial"
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


def write_sweep_state(sweep_dir: str, state: Mapping[str, Any]) -> None:
    """Write the sweep's state file atomically (a local folder)."""
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_sweep_state(sweep_dir: str) -> dict[str, Any] | None:
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def latest_sweep(storage_path: str, dataset: str, kind: str = "sweep") -> str | None:
    """The name of the most recently started sweep of ``dataset`` under ``storage_path`` (of ``kind``: a
    ``platform.tune`` sweep or a study)."""
    root = Path(storage_path)
    found = []
    for state_file in root.glob(f"*/{SWEEP_STATE_FILE}"):
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            continue
        if state.get("dataset") == dataset and state.get("kind", "sweep") == kind:
            found.append((state.get("started_at", 0.0), state_file.parent.name))
    return max(found)[1] if found else None


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def trial_rows(grid: Any, epochs: int) -> list[dict[str, Any]]:
    """One summary row per trial of a ResultGrid (status, epochs reached, metrics, config, checkpoint)."""
    from platform.sweep_tracking import error_line, trial_checkpoint_path

    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "ERROR" if result.error is not None else "FAILED" if m.get(FAILURE_KEY) else "TERMINATED"
        rows.append({
            "trial_id": m.get("trial_id") or Path(result.path).name,
            "status": status,
            "epochs": int(m.get("epoch", 0)),
            "finished": status == "TERMINATED" and int(m.get("epoch", 0)) >= int(m.get(EPOCHS_TOTAL_KEY, epochs))
            and "test_acc" in m,
            "config": dict(result.config or {}),
            "val_acc": m.get("val_acc"),
            "test_acc": m.get("test_acc"),
            "zeroshot_test_acc": m.get("zeroshot_test_acc"),
            "checkpoint_path": trial_checkpoint_path(result, m),
            "failure": m.get(FAILURE_KEY) or (error_line(result.error) if result.error is not None else None),
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


def _dashboards_line(summary: Mapping[str, Any]) -> str:
    files = summary.get("dashboards") or {}
    if not files:
        return f"not drawn (python -m dashboards --parent-run-id {summary['parent_run_id']})"
    folder = Path(next(iter(files.values()))).parent
    return f"{len(files)} files in {folder}, also under the sweep run's {DASHBOARDS_ARTIFACT_DIR}/ artifacts"


def format_report(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The human-readable end-of-sweep report: trials, best configuration beside zero-shot, where to look."""
    from platform.sweep_tracking import describe_config

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
        f"  sweep folder       {summary['sweep_dir']}  (resume: add --resume --sweep-name {summary['sweep_name']})",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from platform.cli import Parser, add_infra_arguments, add_run_arguments

    parser = Parser(
        prog="python -m platform.tune",
        description="Sweep CoOp's prompt design (context length and initialisation, class-token position, "
                    "class-specific context, learning rate) with Ray Tune: Optuna TPE proposes, ASHA stops trials "
                    "that lag on validation accuracy. A one-worker trial runs in its own warm Tune process; a trial "
                    "of several workers is a Ray Train DDP run. Trials are MLflow child runs of the sweep's run; the "
                    "best trial by validation accuracy is registered as coop-<dataset>.",
        epilog="The searched fields (tune_spaces/<dataset>.py) override the matching flags below; the other flags set "
               "every trial.\n"
               "Example (offline, tiny backbone): python -m platform.tune --dataset eurosat --data-root ../shared/data "
               "--backbone tests/fixtures/tiny-vit.json --pretrained none --shots 2 --epochs 3 --num-samples 8\n"
               "Resume after an interruption: the same command with --resume (and --sweep-name NAME, default: the "
               "latest sweep of the dataset).\n"
               "Then: mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--num-samples", type=int, default=None,
                       help="trials to run (default: 16); with --grid, how many times to run the grid (default: 1)")
    sweep.add_argument("--grid", nargs="+", default=[], metavar="FIELD=V1,V2",
                       help="run every combination of these values (Ray Tune's grid search) instead of Optuna's TPE, "
                            "e.g. --grid prompt.n_ctx=4,8,16 prompt.class_token_position=end,front; the searched "
                            "fields not in the grid keep their flag values")
    sweep.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default and cap: as many as the cluster's CPUs/GPUs fit)")
    sweep.add_argument("--workers-per-trial", type=int, dest="num_workers", default=argparse.SUPPRESS,
                       help="workers per trial (same as --num-workers; above 1 each trial is a Ray Train DDP run)")
    sweep.add_argument("--gpus-per-trial", type=float, default=1.0,
                       help="on GPU clusters, the share of one GPU a one-worker trial reserves: 0.25 runs four trials "
                            "per GPU (more trials at once, each a little slower; each holds its own copy of CLIP and "
                            "the features in GPU memory). DDP trials take 1 GPU per worker (default: 1)")
    sweep.add_argument("--trial-runner", default="auto", choices=TRIAL_RUNNERS,
                       help="auto: in-process for one worker per trial, ray-train for several; ray-train forces a Ray "
                            "Train run per trial even for one worker (slower start-up; for comparison)")
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
                       help="failures per trial (a lost process or worker) to recover from at the trial's last "
                            "checkpoint (default: 2)")
    add_infra_arguments(parser)
    return parser


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What kind of sweep :func:`run_sweep` runs: ``platform.tune``'s own, or a study's (``platform/study.py``).

    kind: the sweep folder's and parent run's name prefix (``sweep``, ``study``). entry_point: the CLI, tagged on
    the parent run. search: sample the dataset's search space (False: only ``--grid`` and the flags' values).
    early_stopping: ASHA on validation accuracy (False: every trial runs all its epochs). register: register the best
    trial by validation accuracy. describe: ``describe(spec, state) -> str``, the parent run's description (default:
    the sweep's). finish: ``finish(summary, rows, state) -> dict``, called once the trials have ended and before the
    parent run is closed, to log the plan's own results to it; what it returns joins the summary. report:
    ``report(summary) -> str``, printed after the sweep's report. json_keys: summary keys ``--json`` prints too.
    eval_targets: ``RunSpec.eval_targets`` of every trial (``platform.run_spec.DatasetRef``), tested after training.
    """

    kind: str = "sweep"
    entry_point: str = "platform.tune"
    search: bool = True
    early_stopping: bool = True
    register: bool = True
    describe: Any = None
    finish: Any = None
    report: Any = None
    json_keys: tuple[str, ...] = ()
    eval_targets: tuple[Any, ...] = ()


def grid_epochs(spec: Any, grid: Mapping[str, Sequence[Any]] | None) -> int:
    """The most epochs any trial of the sweep trains (a grid over ``train.shots`` follows CoOp's epochs by shots)."""
    if not grid or "train.shots" not in grid:
        return spec.train.resolved_epochs
    return max(spec.with_overrides({"train.shots": k}).train.resolved_epochs for k in grid["train.shots"])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 no trial finished, 2 bad input / data / weights)."""
    from platform.cli import parse_run_args

    return run_sweep(parse_run_args(build_parser(), argv))


def run_sweep(args: argparse.Namespace, plan: SweepPlan = SweepPlan()) -> int:
    """Run the sweep that ``args`` (:func:`build_parser`'s flags) and ``plan`` describe; returns the exit status."""
    from platform import tracking
    from platform.cli import (
        INPUT_ERRORS,
        check_inputs,
        check_writable_dir,
        configure_logging,
        dataset_ref_from_args,
        fail,
        hub_unreachable_use_cache,
        spec_from_args,
    )
    from platform.cluster_check import check_shared_paths
    from platform.ray_runtime import init_ray, resolve_use_gpu
    from platform.run_spec import RunSpec

    from coop_core.datasets import get_dataset_spec
    from tune_spaces import space_for

    configure_logging(args.verbose)
    tracking.limit_http_retries()
    t0 = time.perf_counter()
    storage_path = args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    try:
        ref = dataset_ref_from_args(args)
    except INPUT_ERRORS as err:
        return fail(str(err))

    state = None
    if args.resume:
        name = args.sweep_name or latest_sweep(storage_path, ref.name, plan.kind)
        if name is None:
            return fail(f"--resume: no sweep of {ref.name!r} under {storage_path} (pass --sweep-name)")
        state = read_sweep_state(_sweep_dir(storage_path, name))
        if state is None:
            return fail(f"--resume: {_sweep_dir(storage_path, name)}/{SWEEP_STATE_FILE} not found; "
                        "is this a sweep folder?")
        args.sweep_name = name
    name = args.sweep_name or f"{plan.kind}-{ref.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = _sweep_dir(storage_path, name)
    try:
        template = ref.source.template if ref.source is not None else get_dataset_spec(ref.name).template
        space = space_for(ref.name, template) if plan.search else {}
        unknown = sorted(set(args.fixed) - set(space))
        if unknown:
            raise ValueError(f"--fixed {' '.join(unknown)}: not searched for {ref.name}; "
                             f"searched fields: {', '.join(space)}")
        space = {k: v for k, v in space.items() if k not in args.fixed}
        if state is not None:
            spec = RunSpec.from_dict(state["base_spec"])
            runner = state["trial_runner"]
        else:
            spec = spec_from_args(args, use_gpu=args.use_gpu != "no")
            spec = dataclasses.replace(spec, eval_targets=plan.eval_targets)
            args.grid = parse_grid(args.grid, spec)
            if args.grid:
                space = {}  # a grid sweep searches nothing else
            if args.num_samples is None:
                args.num_samples = 1 if args.grid else 16
            if args.num_samples < 1:
                raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
            if args.max_failures < 0:
                raise ValueError(f"--max-failures must be >= 0, got {args.max_failures}")
            runner = resolve_trial_runner(args.trial_runner, spec)
        tracking_uri = state["tracking_uri"] if state is not None else tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.probe_tracking_store(tracking_uri)
        if "://" not in storage_path:
            check_writable_dir(storage_path, "--storage-path")
        offline = hub_unreachable_use_cache(spec)
        splits = check_inputs(spec, prompt_candidates(spec, space, state["grid"] if state is not None else args.grid))
        tracking.open_store(tracking_uri)  # last: creating a new store takes seconds, a bad input should not wait
    except INPUT_ERRORS as err:
        return fail(str(err))

    from platform.sweep_tracking import MlflowSweepCallback, error_line

    import ray

    started_ray = init_ray(args.ray_address, quiet=not args.verbose,
                           runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}} if offline else None)
    try:
        if state is None:
            use_gpu = resolve_use_gpu(args.use_gpu)
            if args.use_gpu == "yes" and not resolve_use_gpu("auto"):
                raise ValueError("--use-gpu yes, but the Ray cluster has no GPUs; use --use-gpu no or auto")
            spec = dataclasses.replace(spec, use_gpu=use_gpu)
            gpus_per_trial = validate_gpus_per_trial(args.gpus_per_trial, spec, runner)
        else:
            gpus_per_trial = state["gpus_per_trial"]
        max_concurrent = resolve_max_concurrent(args.max_concurrent, spec, ray.cluster_resources(), gpus_per_trial)
        for warning in check_shared_paths(str(splits.image_dir), {"--storage-path": storage_path},
                                          {"--cache-dir": spec.cache_dir}):
            logger.warning("%s", warning)
    except ValueError as err:
        return fail(str(err))
    epochs = grid_epochs(spec, state["grid"] if state is not None else args.grid)

    try:
        if state is None:
            state = open_sweep(args, spec, space, name, sweep_dir, max_concurrent, runner, gpus_per_trial, plan)
        else:
            from mlflow.tracking import MlflowClient

            MlflowClient(state["tracking_uri"]).update_run(state["parent_run_id"], status="RUNNING")
    except Exception as err:  # the store passed the probe a moment ago and failed now: nothing has run yet
        return fail(f"MLflow tracking failed before the sweep started ({error_line(err)}); nothing was trained, "
                    "run the command again once the tracking store works")
    resumed = args.resume
    n_trials = state["num_samples"] * math.prod(len(v) for v in (state.get("grid") or {}).values())
    logger.info("%s %s: %d trials of %s, %d at once (%s trials); MLflow run %s (%s)", plan.kind, name, n_trials,
                spec.data_ref.label, max_concurrent, state["trial_runner"], state["parent_run_id"],
                state["tracking_uri"])

    callback = MlflowSweepCallback(parent_run_id=state["parent_run_id"], experiment=state["experiment"],
                                   tracking_uri=state["tracking_uri"], base_spec=spec.to_dict(),
                                   storage_path=storage_path, epochs=epochs, sweep_name=name)
    bars = ConsoleProgress(bars_wanted(json_output=args.json, verbose=args.verbose), labels=BAR_LABELS)
    with bars:
        trial_bar = TrialBar(bars, n_trials, epochs, METRIC)
        tuner = build_tuner(args, spec, space, state, name, storage_path, sweep_dir, max_concurrent,
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
    if args.json:
        print(json.dumps({k: summary.get(k) for k in (*JSON_KEYS, *plan.json_keys)}, sort_keys=True))
    return 0 if best is not None and tracking_error is None else 1


class SweepInterrupt:
    """Ctrl-C (SIGINT) during ``tuner.fit()``: tell the MLflow callback first, then stop Ray Tune gracefully.

    Ray Tune's own SIGINT handler stops the sweep and saves its state, but then reports the stopped trials as ended
    (``on_trial_complete``), so a callback cannot tell an interrupted trial from a finished one. So Tune's SIGINT
    handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``, read when ``fit()`` starts) and this one marks the
    callback as stopping, then sends SIGUSR1, on which Tune runs the same graceful stop. A second Ctrl-C quits at once.
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.requested = False

    def __enter__(self) -> SweepInterrupt:
        import signal
        import threading

        self._active = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
        if self._active:
            self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # a second Ctrl-C, or Tune's handler is not (yet, or any more) installed
        self.requested = True
        self.callback.stopping = True
        logger.warning("interrupted: stopping the trials and saving the sweep's state (Ctrl-C again to quit at once)")
        os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's graceful stop

    def __exit__(self, *exc: Any) -> None:
        import signal

        if not self._active:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env


def interrupted(callback: Any, summary: Mapping[str, Any], state: Mapping[str, Any], started_ray: bool) -> int:
    """End an interrupted sweep cleanly: the runs of the trials it stopped, and the sweep's run, end KILLED
    (``--resume`` continues them and sets them running again); nothing is registered; exit status 130."""
    from platform import tracking
    from platform.sweep_tracking import error_line

    import ray

    try:
        for run in callback.child_runs().values():
            if run.info.status == "RUNNING":
                tracking.end_run(run.info.run_id, "KILLED", tracking_uri=callback.tracking_uri)
        tracking.end_run(state["parent_run_id"], "KILLED", tracking_uri=state["tracking_uri"])
    except Exception as err:  # the store is gone too: --resume closes the runs later
        logger.warning("could not mark the interrupted runs in MLflow (%s)", error_line(err))
    if started_ray:
        ray.shutdown()
    sys.stderr.write(f"interrupted: the sweep's {summary['trials']} trials are kept with their checkpoints; their "
                     f"MLflow runs are marked KILLED. Finish the sweep with: {callback.log_command()}\n")
    return 130


def close_unclosed_runs(callback: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Close the child runs of trials that ended while no driver was watching (a killed or interrupted driver), so
    no run stays RUNNING: finished trials become FINISHED (with their metrics and artifacts from the checkpoint),
    failed and errored ones FAILED with the reason."""
    runs = callback.child_runs()
    for row in rows:
        run = runs.get(row["trial_id"])
        status = run.info.status if run is not None else None
        if row["status"] == "TERMINATED" and status != "FINISHED" or row["status"] == "FAILED" and status != "FAILED":
            callback.finish_from_result(row["trial_id"], row["config"], row["last_result"], row["checkpoint_path"])
        elif row["status"] == "ERROR" and status != "FAILED":
            callback.mark_failed(row["trial_id"], row["config"], row["failure"] or "error (see the trial's Ray logs)")


def open_sweep(args: argparse.Namespace, spec: Any, space: Mapping[str, Any], name: str, sweep_dir: str,
               max_concurrent: int, runner: str, gpus_per_trial: float, plan: SweepPlan = SweepPlan()
               ) -> dict[str, Any]:
    """Start the sweep's MLflow parent run (base config and sweep settings as params) and write its state file."""
    from platform import tracking

    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    experiment = args.experiment or tracking.default_experiment(spec.dataset)
    epochs = grid_epochs(spec, args.grid)
    parent_run_id = tracking.create_run(experiment, run_name=name, tracking_uri=tracking_uri,
                                        tags={"coop.entry_point": plan.entry_point, "coop.sweep": name,
                                              "coop.sweep_dir": sweep_dir})
    search_seed = spec.train.seed if args.search_seed is None else args.search_seed
    sweep_params = {"sweep.num_samples": args.num_samples, "sweep.max_concurrent": max_concurrent,
                    "sweep.search_seed": search_seed, "sweep.searcher": "grid" if args.grid else "optuna-tpe",
                    "sweep.grid": json.dumps(args.grid) if args.grid else "-",
                    "sweep.scheduler": f"asha(metric={METRIC}, grace={args.grace_period}, "
                                       f"rf={args.reduction_factor}, max_t={epochs})" if plan.early_stopping
                                       else "none (every trial runs all its epochs)",
                    "sweep.space": json.dumps({k: repr(v) for k, v in space.items()}),
                    "sweep.fixed": " ".join(args.fixed) or "-", "sweep.trial_runner": runner,
                    "sweep.gpus_per_trial": gpus_per_trial, "sweep.max_failures": args.max_failures}
    tracking.log_params(parent_run_id, tracking.flatten_params(spec) | sweep_params, tracking_uri=tracking_uri)
    experiment_id = tracking.get_or_create_experiment(experiment, tracking_uri=tracking_uri)
    searched = list(args.grid) if args.grid else list(space)
    view_key = save_sweep_view(experiment_id, name, searched, tracking_uri)
    runs_url = tracking.runs_view_url(tracking_uri, experiment_id, view_key)
    what = (f"grid over {', '.join(f'`{k}`' for k in searched)}" if args.grid
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
    state = {"dataset": spec.dataset, "base_spec": spec.to_dict(), "parent_run_id": parent_run_id,
             "tracking_uri": tracking_uri, "experiment": experiment, "experiment_id": experiment_id,
             "started_at": time.time(), "runs_url": runs_url,
             "num_samples": args.num_samples, "search_seed": search_seed, "epochs": epochs, "trial_runner": runner,
             "gpus_per_trial": gpus_per_trial, "max_failures": args.max_failures, "grid": args.grid,
             "kind": plan.kind, "early_stopping": plan.early_stopping, "register": plan.register}
    if "://" not in sweep_dir:
        write_sweep_state(sweep_dir, state)
    return state


def save_sweep_view(experiment_id: str, name: str, searched: Sequence[str], tracking_uri: str) -> str:
    """Save the sweep's view of the runs table: accuracies and searched parameters as columns
    (``platform.tracking.save_runs_view``); returns the view key."""
    from platform import tracking
    columns = [*(tracking.metric_column(k) for k in ACCURACY_KEYS), *(tracking.param_column(k) for k in searched),
               f"tags.`{tracking.EARLY_STOPPED_TAG}`"]
    key = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return tracking.save_runs_view(experiment_id, key, columns=columns, tracking_uri=tracking_uri)


def build_tuner(args: argparse.Namespace, spec: Any, space: Mapping[str, Any], state: Mapping[str, Any], name: str,
                storage_path: str, sweep_dir: str, max_concurrent: int, callbacks: Sequence[Any], *, restore: bool,
                epoch_hooks: Sequence[Any] = (), progress_board: Any = None) -> Any:
    """The Tuner: restored from ``sweep_dir`` (searcher, scheduler, trial states) or new (Optuna TPE + ASHA).

    Single-worker trials (``in-process``) reserve their worker's CPUs and GPU share, reuse their actor for the next
    trial, and are retried from their last checkpoint by Tune (``max_failures``). Multi-worker trials (``ray-train``)
    reserve only a little memory — their Ray Train workers hold the CPUs — and recover lost workers inside Ray Train.
    ``epoch_hooks`` reach every trial's training function (see ``platform.worker.run_training``);
    ``progress_board`` (``platform.progress``) receives the trials' feature-extraction progress for the driver's bars.
    """
    from platform.trials import in_process_trial, ray_train_trial

    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    log_level = "INFO" if args.verbose else "WARNING"
    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory ..."
    max_failures = state["max_failures"]
    if state["trial_runner"] == "in-process":
        resources = {"cpu": spec.cpus_per_worker, "gpu": state["gpus_per_trial"] if spec.use_gpu else 0}
        trainable = tune.with_resources(tune.with_parameters(
            in_process_trial, base_spec=spec.to_dict(), log_level=log_level, epoch_hooks=list(epoch_hooks),
            progress_board=progress_board),
            resources)
        trial_failures = max_failures
    else:
        trainable = tune.with_resources(tune.with_parameters(
            ray_train_trial, base_spec=spec.to_dict(), train_storage=f"{sweep_dir}/{TRAIN_RUNS_DIR}",
            max_failures=max_failures, log_level=log_level, epoch_hooks=list(epoch_hooks)),
            {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
        trial_failures = 0  # Ray Train restarts lost workers from the run's checkpoint
    # Keeping 2 checkpoints per trial makes Tune snapshot its experiment state whenever a trial has checkpointed
    # twice (so --resume never points at a deleted checkpoint); with one checkpoint per CoOp epoch that is often, and
    # Tune warns about it each time. The snapshot is a small local write; the warning is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints its configuration box, the results folder and a TensorBoard hint even at
    # verbose=0; its legacy output (RAY_AIR_NEW_OUTPUT=0, a documented switch) is silent at verbose=0. The sweep's own
    # lines, bars and report say the same things. --verbose keeps Tune's output.
    if not args.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A diverged trial ends with a report that has the reason (artifacts.FAILURE_KEY) and no val_acc; Tune's strict
    # metric check would turn that report into an error the trial is retried for (diverging again). Without the
    # check ASHA ignores the report and Optuna records the trial as pruned. Read by Tune at every result.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if restore and tune.Tuner.can_restore(sweep_dir):
        logger.info("resuming sweep %s from %s", name, sweep_dir)
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    epochs = grid_epochs(spec, state.get("grid"))
    asha = dict(time_attr="epoch", max_t=epochs, grace_period=min(args.grace_period, epochs),
                reduction_factor=args.reduction_factor)
    if not state.get("early_stopping", True):
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()  # a study: every trial runs all its epochs
    elif state["trial_runner"] == "ray-train":
        from platform.trial_stopping import GracefulASHA

        scheduler = GracefulASHA(**asha)
    else:
        scheduler = ASHAScheduler(**asha)
    if state.get("grid"):
        param_space = {k: tune.grid_search(list(v)) for k, v in state["grid"].items()}
        search_alg = None  # Tune's own variant generator walks the grid
    else:
        param_space = to_tune_space(space)
        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=state["search_seed"]))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=state["num_samples"],
            max_concurrent_trials=max_concurrent,
            # Warm processes: the next trial runs in the previous trial's actor, whose warm cache holds CLIP and the
            # features. Safe for our function trainable: every trial builds its own context, optimiser and RNG state
            # (tests/platform/test_warm_trials.py), and ray_runtime raises Tune's wait for a stopped trial's thread so
            # a reuse never fails mid-epoch. Multi-worker trials hold no model in their actor, so nothing to reuse.
            reuse_actors=state["trial_runner"] == "in-process",
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=trial_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
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
        "trials_errored": sum(r["status"] in ("ERROR", "FAILED") for r in rows),
        "parent_run_id": state["parent_run_id"], "experiment": state["experiment"],
        "tracking_uri": state["tracking_uri"], "ui_command": tracking.ui_command(state["tracking_uri"]),
        "runs_url": state.get("runs_url"),
        "resumed": resumed, "trial_runner": state["trial_runner"], "best_config": None, "best_trial_id": None,
        "best_run_id": None, "val_acc": None,
        "test_acc": None, "zeroshot_test_acc": None, "registered_model": registered_model_name(spec.model_key),
        "registered_version": None, "champion_version": None, "champion_reason": None,
        "register": state.get("register", True),
    }


def best_trial_summary(best: Mapping[str, Any], callback: Any) -> dict[str, Any]:
    """The summary fields of the best trial when nothing is registered (a study)."""
    from platform.trials import searched_overrides

    return {"best_config": searched_overrides(best["config"]), "best_trial_id": best["trial_id"],
            "best_run_id": callback.run_for(best["trial_id"], best["config"]), "val_acc": best["val_acc"],
            "test_acc": best["test_acc"], "zeroshot_test_acc": best["zeroshot_test_acc"],
            "n_ctx_effective": best["last_result"].get("n_ctx_effective")}


def register_best(best: Mapping[str, Any], callback: Any, state: Mapping[str, Any], name: str,
                  storage_path: str) -> dict[str, Any]:
    """Register the best trial's final prompts (``platform.registry``); the summary fields it adds."""
    from platform import artifacts
    from platform.registry import register_prompt
    from platform.sweep_tracking import checkpoint_dir
    from platform.trials import searched_overrides

    best_run_id = callback.run_for(best["trial_id"], best["config"])
    with checkpoint_dir(best["checkpoint_path"], storage_path) as d:
        resolved = artifacts.read_config(d)
        registration = register_prompt(
            d, resolved, best["last_result"], run_id=best_run_id, tracking_uri=state["tracking_uri"],
            extra_tags={"sweep_run_id": state["parent_run_id"], "trial_id": best["trial_id"], "sweep": name},
        )
    return {
        "best_config": searched_overrides(best["config"]), "best_trial_id": best["trial_id"],
        "best_run_id": best_run_id, "val_acc": best["val_acc"], "test_acc": best["test_acc"],
        "zeroshot_test_acc": best["zeroshot_test_acc"], "n_ctx_effective": resolved.get(artifacts.N_CTX_EFFECTIVE_KEY),
        "registered_version": registration.version, "champion_version": registration.champion_version,
        "champion_reason": registration.reason,
    }


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


def draw_dashboards(state: Mapping[str, Any], sweep_dir: str) -> dict[str, str]:
    """Draw the sweep's dashboards (``dashboards.report``) and log them to its parent run; the files by name.

    A failure here costs the pictures, never the sweep: it is logged in one line and the report says how to retry.
    """
    from mlflow.tracking import MlflowClient

    from dashboards.report import build_dashboards

    out = Path(sweep_dir) / DASHBOARDS_ARTIFACT_DIR if "://" not in sweep_dir else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = build_dashboards(MlflowClient(state["tracking_uri"]), state["parent_run_id"], out or Path(tmp),
                                      log=True)
    except Exception as err:  # a plotting or store error: keep the sweep's outcome
        logger.warning("dashboards not drawn (%s: %s); retry with: python -m dashboards --parent-run-id %s",
                       type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "",
                       state["parent_run_id"])
        return {}
    return result["files"] if out is not None else {k: f"{DASHBOARDS_ARTIFACT_DIR}/{Path(v).name}"
                                                    for k, v in result["files"].items()}


def close_sweep(summary: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Log the sweep's outcome on the parent run and end it (FINISHED, or FAILED when no trial finished)."""
    from platform import tracking

    from mlflow.tracking import MlflowClient

    uri, parent = state["tracking_uri"], state["parent_run_id"]
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


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so log records carry the "platform.tune" logger name.
    from platform.tune import main as _main

    try:
        sys.exit(_main())
    except KeyboardInterrupt:  # Ctrl-C outside the training itself (which handles its own): no traceback
        sys.stderr.write("interrupted\n")
        sys.exit(130)
