"""The sweep's command-line side, shared by ``platform.tune`` and ``platform.study``: the sweep flags (declared once),
the frozen settings they become, and :func:`present`, how a CLI prints a sweep's outcome.

A study runs a fixed grid of shots and seeds with nothing searched and no trial stopped early, so it takes only the
flags that decide where and how its trials run; ``platform.tune`` takes them all.
"""

from __future__ import annotations

import argparse
import json
import sys
from platform.cli import fail
from platform.sweep.outcome import SweepOutcome
from platform.sweep.plan import TRIAL_RUNNERS, InfraSettings, SweepPlan, SweepSettings
from platform.sweep.report import JSON_KEYS, format_report


def add_sweep_arguments(parser: argparse.ArgumentParser, *, study: bool = False) -> None:
    """The sweep's flags (``study=True``: a study's, which has no search, no early stopping and ``--study-name``)."""
    what = "study" if study else "sweep"
    group = parser.add_argument_group(what)
    if not study:
        group.add_argument("--num-samples", type=int, default=None,
                           help="trials to run (default: 16); with --grid, how many times to run the grid (default: 1)")
        group.add_argument("--grid", nargs="+", default=[], metavar="FIELD=V1,V2",
                           help="run every combination of these values (Ray Tune's grid search) instead of Optuna's "
                                "TPE, e.g. --grid prompt.n_ctx=4,8,16 prompt.class_token_position=end,front; the "
                                "searched fields not in the grid keep their flag values")
    group.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default and cap: as many as the cluster's CPUs/GPUs fit)")
    group.add_argument("--workers-per-trial", type=int, dest="num_workers", default=argparse.SUPPRESS,
                       help="workers per trial (same as --num-workers; above 1 each trial is a Ray Train DDP run)")
    group.add_argument("--gpus-per-trial", type=float, default=1.0,
                       help="on GPU clusters, the share of one GPU a one-worker trial reserves: 0.25 runs four trials "
                            "per GPU (more trials at once, each a little slower; each holds its own copy of CLIP and "
                            "the features in GPU memory). DDP trials take 1 GPU per worker (default: 1)")
    group.add_argument("--trial-runner", default="auto", choices=TRIAL_RUNNERS,
                       help=argparse.SUPPRESS if study else
                       "auto: in-process for one worker per trial, ray-train for several; ray-train forces a Ray "
                       "Train run per trial even for one worker (slower start-up; for comparison)")
    if not study:
        group.add_argument("--fixed", nargs="+", default=[], metavar="FIELD",
                           help="searched fields to hold at their flag value instead, e.g. --fixed train.lr "
                                "prompt.ctx_init (with --lr 1e-4 --ctx-init '')")
        group.add_argument("--search-seed", type=int, default=None,
                           help="seed of Optuna's TPE sampler (default: --seed); --seed itself seeds the few-shot "
                                "split and context initialisation of every trial")
        group.add_argument("--grace-period", type=int, default=1,
                           help="epochs every trial runs before ASHA may stop it (default: 1)")
        group.add_argument("--reduction-factor", type=float, default=2.0,
                           help="ASHA keeps the top 1/factor of trials at each rung (default: 2)")
    group.add_argument("--pack-size", default="1", metavar="N|auto",
                       help="configurations trained together in one trial on one copy of CLIP, one text-encoder "
                            "batch per step (each keeps its own MLflow run, checkpoint, early-stopping decision and "
                            "result); auto: the sweep's configurations spread over the trials that run at once, as "
                            "many per trial as the text step's memory allows; 1: one configuration per trial "
                            "(default: 1)")
    group.add_argument(f"--{what}-name", dest="sweep_name", default=None,
                       help=f"folder of the {what} under --storage-path (default: {what}-<dataset>-<time>)")
    group.add_argument("--resume", action="store_true",
                       help=f"finish the interrupted {what} --{what}-name (default: the latest of --dataset) without "
                            "re-running finished trials; uses its saved configuration")
    group.add_argument("--max-failures", type=int, default=2,
                       help="failures per trial (a lost process or worker) to recover from at the trial's last "
                            "checkpoint (default: 2)")


def sweep_settings_from_args(args: argparse.Namespace) -> SweepSettings:
    """:class:`SweepSettings` of :func:`add_sweep_arguments`'s flags; a flag a study does not have keeps the
    settings' default (no search, no early stopping to set).

    Raises:
        ValueError: a value out of its range (the message names the flag).
    """
    given = {k: getattr(args, k) for k in _SETTING_FLAGS if hasattr(args, k)}
    given |= {k: tuple(getattr(args, k)) for k in ("grid", "fixed") if hasattr(args, k)}
    if hasattr(args, "method"):  # tune's and study's --method takes several values (platform.cli)
        given["methods"] = tuple(args.method)
    return SweepSettings(**given, name=args.sweep_name)


# The settings whose flag has the field's own name (grid and fixed become tuples; --sweep/--study-name is ``name``).
_SETTING_FLAGS = ("num_samples", "max_concurrent", "gpus_per_trial", "trial_runner", "search_seed", "grace_period",
                  "reduction_factor", "max_failures", "resume", "pack_size")


def infra_settings_from_args(args: argparse.Namespace) -> InfraSettings:
    """:class:`InfraSettings` of ``platform.cli.add_infra_arguments``'s flags and ``--use-gpu``."""
    return InfraSettings(storage_path=args.storage_path, tracking_uri=args.tracking_uri, experiment=args.experiment,
                         ray_address=args.ray_address, use_gpu=args.use_gpu, verbose=args.verbose, json=args.json)


def present(outcome: SweepOutcome, plan: SweepPlan = SweepPlan(), *, json_output: bool = False) -> int:
    """Print ``outcome`` as a CLI does and return its exit status: a refused input as one ``error:`` line on stderr;
    an interrupted sweep's notice on stderr; otherwise the report (and the plan's own, once MLflow has everything)
    on stdout, with ``--json``'s line last."""
    if outcome.error is not None:
        return fail(outcome.error)
    if outcome.notice is not None:
        sys.stderr.write(outcome.notice + "\n")
        return outcome.status
    summary = outcome.summary or {}
    print(format_report(summary, outcome.rows))
    if plan.report is not None and summary.get("tracking_error") is None:
        print(plan.report(summary))
    if json_output:
        print(json.dumps({k: summary.get(k) for k in (*JSON_KEYS, *plan.json_keys)}, sort_keys=True))
    return outcome.status
