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
is registered as a new version of ``coop-<dataset>``; ``@champion`` moves to it only if it beats the champion on the
same images with the same CLIP (``platform/registry.py``).

``--resume`` finishes an interrupted sweep from its folder under ``--storage-path``: finished trials are kept,
unfinished and errored ones continue from their last checkpoint, the searcher's state is restored, and the same
MLflow runs are continued.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from platform.cli import (
    Parser,
    add_infra_arguments,
    add_run_arguments,
    configure_logging,
    fail,
    parse_run_args,
    spec_from_args,
)
from platform.launch import INPUT_ERRORS
from platform.sweep.flags import add_sweep_arguments, infra_settings_from_args, present, sweep_settings_from_args
from platform.sweep.run import run_sweep

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:

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
    add_run_arguments(parser, sweep=True)
    add_sweep_arguments(parser)
    add_infra_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 no trial finished, 2 bad input / data / weights)."""
    args = parse_run_args(build_parser(), argv)
    configure_logging(args.verbose)
    try:
        settings = sweep_settings_from_args(args)
        infra = infra_settings_from_args(args)
        spec = spec_from_args(args, use_gpu=args.use_gpu != "no")  # resolved against the cluster once Ray is up
    except INPUT_ERRORS as err:
        return fail(str(err))
    return present(run_sweep(spec, settings, infra), json_output=infra.json)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so log records carry the "platform.tune" logger name.
    from platform.cli import run_command
    from platform.tune import main as _main

    run_command(_main)
