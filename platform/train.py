"""Train CoOp on one dataset as a Ray Train job: ``python -m platform.train --dataset eurosat``.

Every run goes through Ray Train, with one worker or many: each worker runs ``platform.worker.run_training`` (plain
``coop_core`` plus a Ray Train session) on its shard of every deterministic global batch, with the context gradient
all-reduced, so any number of workers takes the one-worker optimisation steps (``platform/distributed.py``). Rank 0
writes a checkpoint every epoch; a failed worker makes Ray Train restart the group from the last checkpoint
(``FailureConfig``). After the last epoch rank 0 evaluates on the test split (never used for selection), plus
zero-shot CLIP, and saves the learned prompts, the resolved config and the nearest-words table
(``platform/artifacts.py``).

The driver (:func:`main`) validates data and weights before starting Ray (offline failures are one line, exit 2),
runs the trainer, then logs the run to MLflow from this one process (``platform.tracking``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform import artifacts, tracking
from platform.cli import (
    Parser,
    add_infra_arguments,
    add_run_arguments,
    configure_logging,
    fail,
    parse_run_args,
    spec_from_args,
)
from platform.launch import INPUT_ERRORS, check_before_ray, resolve_gpus, start_ray, warn_unshared_paths
from platform.progress import ConsoleProgress, bars_wanted
from platform.tracking_store import limit_http_retries
from platform.trainer import build_trainer
from typing import Any

import ray

from coop_core.config import METHOD_TITLES

logger = logging.getLogger(__name__)

BAR_LABELS = {"features": "image features", "epochs": "epochs"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m platform.train",
        description="Train CoOp prompts for CLIP on one dataset with Ray Train (DDP across --num-workers), track the "
                    "run in MLflow and save the learned prompts.",
        epilog="Example (offline smoke run): python -m platform.train --dataset eurosat --data-root ../shared/data "
               "--backbone tests/fixtures/tiny-vit.json --pretrained none --shots 2 --epochs 3 --num-workers 2\n"
               "Then: mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker failures to recover from, restarting at the last checkpoint (default: 2)")
    add_infra_arguments(parser)
    return parser


def format_summary(summary: Mapping[str, Any]) -> str:
    """The human table printed at the end of a run."""
    def pct(key: str) -> str:
        v = summary.get(key)
        return f"{v:6.2f}" if isinstance(v, (int, float)) else "     -"

    title = METHOD_TITLES.get(summary.get("method", "coop"), "CoOp")
    lines = [
        "",
        f"{title} on {summary['dataset']} ({summary['shots']}-shot, seed {summary['seed']}, {summary['backbone']}, "
        f"{summary['epochs']} epochs, {summary['num_workers']} worker(s), {summary['text_sharding']}-sharded text)",
        "                      acc %   macro-F1 %",
        f"  val (few-shot)     {pct('val_acc')}   {pct('val_macro_f1')}",
        f"  test ({title})".ljust(21) + f"{pct('test_acc')}   {pct('test_macro_f1')}",
        f"  test (zero-shot)   {pct('zeroshot_test_acc')}   {pct('zeroshot_test_macro_f1')}",
        "",
        f"  MLflow run      {summary['run_id']}  (experiment {summary['experiment']!r})",
        f"  prompts         {summary['prompts']}",
        f"  wall time       {summary['wall_s']:.1f}s (training loop {summary.get('time_train_loop_s', 0.0):.1f}s)",
        f"  open the UI     {summary['ui_command']}",
        f"  the run         {summary['run_url']}",
    ]
    return "\n".join(lines)


def run_description(spec: Any, final: Mapping[str, Any], experiment_id: str, run_id: str, checkpoint: str) -> str:
    """The run's Markdown description in the MLflow UI: what was trained, how well, links to its config and files."""

    accs = ", ".join(f"{k} {final[k]:.2f} %" for k in artifacts.ACCURACY_KEYS if final.get(k) is not None)
    config_link = tracking.artifact_link(experiment_id, run_id, artifacts.CONFIG_FILE)
    prompts = f"{artifacts.PROMPTS_ARTIFACT_DIR}/{artifacts.PROMPTS_FILE}"
    return "\n".join([
        f"**{METHOD_TITLES[spec.method.name]} on {spec.dataset}**: {spec.train.shots}-shot, seed {spec.train.seed}, "
        f"`{spec.model.backbone}`, "
        f"{spec.train.resolved_epochs} epochs, {spec.num_workers} Ray Train worker(s)", "",
        f"- {accs or 'no final metrics'}",
        f"- config: [{artifacts.CONFIG_FILE}]({config_link}) (the resolved configuration; also this run's params)",
        f"- learned prompts: [{prompts}]({tracking.artifact_link(experiment_id, run_id, prompts)})",
        f"- Ray checkpoint: `{checkpoint}`",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 training failed, 2 bad input / data / weights)."""

    args = parse_run_args(build_parser(), argv)
    configure_logging(args.verbose)
    limit_http_retries()
    t0 = time.perf_counter()
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    try:
        # --use-gpu auto is resolved once Ray is up; until then assume GPUs may exist (so 'amp' is not refused yet).
        spec = spec_from_args(args, use_gpu=args.use_gpu != "no")
        checked = check_before_ray(spec, tracking_uri=tracking_uri, storage_path=args.storage_path)
        started_ray = start_ray(args.ray_address, verbose=args.verbose, offline=checked.offline,
                                tracking_uri=tracking_uri)
    except INPUT_ERRORS as err:
        return fail(str(err))

    try:
        spec = resolve_gpus(spec, args.use_gpu)
        warn_unshared_paths(checked.splits, spec, args.storage_path)
    except ValueError as err:
        return fail(str(err))

    experiment = args.experiment or tracking.default_experiment(spec.dataset)
    name = f"coop-{spec.dataset}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_id = tracking.create_run(experiment, run_name=name, tracking_uri=tracking_uri,
                                 tags={"coop.entry_point": "platform.train"})
    tracking.log_params(run_id, spec, tracking_uri=tracking_uri)
    logger.info("MLflow run %s (experiment %r, %s)", run_id, experiment, tracking_uri)
    logger.info("starting %d Ray Train worker(s) (%s); checkpoints under %s/%s", spec.num_workers,
                "GPU" if spec.use_gpu else "CPU", args.storage_path, name)
    bars = ConsoleProgress(bars_wanted(json_output=args.json, verbose=args.verbose), labels=BAR_LABELS)
    try:
        with bars:
            trainer = build_trainer(spec, storage_path=args.storage_path, name=name, max_failures=args.max_failures,
                                    log_level="INFO" if args.verbose else "WARNING", progress_board=bars.board)
            result = trainer.fit()
    except KeyboardInterrupt:
        tracking.end_run(run_id, "KILLED", tracking_uri=tracking_uri)
        sys.stderr.write(f"interrupted (MLflow run {run_id} marked KILLED)\n")
        return 130
    except Exception as err:  # Ray Train wraps worker errors in TrainingFailedError
        tracking.end_run(run_id, "FAILED", tracking_uri=tracking_uri)
        sys.stderr.write(f"error: training failed ({type(err).__name__}): {str(err).strip().splitlines()[0]}\n"
                         f"(MLflow run {run_id} marked FAILED; worker logs are above)\n")
        return 1
    failure = (result.metrics or {}).get(artifacts.FAILURE_KEY)
    if failure:  # the run diverged: log the epochs it completed, mark it FAILED with the reason
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as ckpt_dir:
                tracking.log_checkpoint(run_id, ckpt_dir, tracking_uri=tracking_uri)
        tracking.set_tag(run_id, tracking.FAILURE_TAG, failure, tracking_uri=tracking_uri)
        tracking.end_run(run_id, "FAILED", tracking_uri=tracking_uri)
        return fail(f"{failure} (MLflow run {run_id} marked FAILED)")
    try:
        with result.checkpoint.as_directory() as ckpt_dir:
            final = tracking.log_checkpoint(run_id, ckpt_dir, tracking_uri=tracking_uri)
            resolved = artifacts.read_config(ckpt_dir)
        tracking.log_params(run_id, {param: resolved[key] for key, param in artifacts.RESOLVED_PARAMS.items()},
                            tracking_uri=tracking_uri)
        experiment_id = tracking.get_or_create_experiment(experiment, tracking_uri=tracking_uri)
        tracking.set_tag(run_id, tracking.CHECKPOINT_TAG, result.checkpoint.path, tracking_uri=tracking_uri)
        tracking.set_description(run_id, run_description(spec, final, experiment_id, run_id, result.checkpoint.path),
                                 tracking_uri=tracking_uri)
        wall_s = time.perf_counter() - t0
        timing = {k: final[k] for k in artifacts.WORKER_TIMING_KEYS if k in final}
        tracking.log_final_metrics(run_id, {"wall_s": wall_s, **timing}, step=spec.train.resolved_epochs,
                                   tracking_uri=tracking_uri)
        tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    except Exception as err:  # the tracking store went away while the run trained: the results are safe on disk
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        sys.stderr.write(f"error: the run finished, but logging it to MLflow at {tracking_uri} failed ({reason}); "
                         f"its checkpoint, metrics and prompts are in {result.checkpoint.path}\n")
        return 1
    if started_ray:
        ray.shutdown()  # stops forwarding worker logs, so nothing can follow the summary on stdout

    summary: dict[str, Any] = {
        "run_id": run_id, "experiment": experiment, "tracking_uri": tracking_uri, "dataset": spec.dataset,
        "shots": spec.train.shots, "seed": spec.train.seed, "backbone": spec.model.backbone, "method": spec.method.name,
        "epochs": spec.train.resolved_epochs, "num_workers": spec.num_workers, "use_gpu": spec.use_gpu,
        "text_sharding": resolved[artifacts.TEXT_SHARDING_USED_KEY],
        **{k: final[k] for k in ("val_acc", "val_macro_f1", *artifacts.FINAL_KEYS, "train_loss",
                                 *artifacts.WORKER_TIMING_KEYS) if k in final},
        "checkpoint": result.checkpoint.path,
        "prompts": str(Path(result.checkpoint.path) / artifacts.PROMPTS_FILE),
        "wall_s": wall_s,
        "ui_command": tracking.ui_command(tracking_uri),
        "run_url": tracking.run_url(tracking_uri, experiment_id, run_id),
    }
    print(format_summary(summary))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so log records carry the "platform.train" logger name.
    from platform.cli import run_command
    from platform.train import main as _main

    run_command(_main)
