"""``python -m dashboards``: draw a sweep's dashboards from MLflow and log them to its parent run.

    python -m dashboards --parent-run-id <id>                      # the id platform.tune prints
    python -m dashboards --sweep-name sweep-eurosat-20250101-1200  # by name, in experiment coop-<dataset>
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from run_format import resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards",
        description="Draw a CoOp sweep's dashboards from MLflow (validation curves with ASHA stops, Optuna parameter "
                    "importances, parallel coordinates, accuracy vs shots, the best context's nearest words) and "
                    "log them under the sweep run's dashboards/ artifacts, where the MLflow UI shows them.",
        epilog="Example: python -m dashboards --tracking-uri sqlite:///mlflow.db --sweep-name good --out dashboards",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--parent-run-id", help="the sweep's MLflow run id (printed by platform.tune)")
    which.add_argument("--sweep-name", help="the sweep's name (platform.tune --sweep-name; the latest with that name)")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment to look for --sweep-name in (default: all)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--out", default="dashboards_out", help="folder for the files (default: %(default)s)")
    parser.add_argument("--no-log", action="store_true", help="only write the files; do not log them to the run")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the files last")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, draw, print; exit 0, or 2 with one line when the run or store cannot be read."""
    args = build_parser().parse_args(argv)
    # Imported here, not at the top: MLflow, Optuna, matplotlib and the nearest-words reader (coop_core, so torch)
    # take 13-16 s to import in a fresh process on the 2-core development machine; --help and a usage error need none.
    from mlflow.tracking import MlflowClient

    from dashboards.report import build_dashboards
    from dashboards.sweep import find_sweep

    client = MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri))
    try:
        parent = args.parent_run_id or find_sweep(client, args.sweep_name, args.experiment)
        result = build_dashboards(client, parent, Path(args.out), log=not args.no_log)
    except Exception as err:  # unknown run or sweep, unreachable store: one line, no traceback
        # The platform CLIs' failure (platform.cli.fail): one "error:" line on stderr, exit 2. Written out here, as the
        # dashboards import nothing of platform (platform calls them; see run_format).
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"error: {line}\n")
        return 2
    for name, path in result["files"].items():
        print(f"{name:<18} {path}")
    for name, why in result["skipped"].items():
        print(f"{name:<18} skipped: {why}")
    if not args.no_log:
        print(f"logged to run {parent} under dashboards/")
    if args.json:
        print(json.dumps({"parent_run_id": parent, "files": result["files"], "skipped": result["skipped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
