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
import logging
import sys
from collections.abc import Sequence
from platform.sweep.plan import TRIAL_RUNNERS
from platform.sweep.run import run_sweep

logger = logging.getLogger(__name__)


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

def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 no trial finished, 2 bad input / data / weights)."""
    from platform.cli import parse_run_args

    return run_sweep(parse_run_args(build_parser(), argv))


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so log records carry the "platform.tune" logger name.
    from platform.tune import main as _main

    try:
        sys.exit(_main())
    except KeyboardInterrupt:  # Ctrl-C outside the training itself (which handles its own): no traceback
        sys.stderr.write("interrupted\n")
        sys.exit(130)
