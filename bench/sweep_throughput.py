"""Sweep throughput: the same sweep with a Ray Train run per trial (the old path) and with in-process trials (ours).

Both sides run ``python -m platform.tune`` itself, each in its own process with its own local Ray (all of this
machine's CPUs), on real EuroSAT from ``../shared/data`` with a tiny random-weight ViT: the same ``--trials`` fixed
configurations (a ``--grid`` over ``prompt.n_ctx``, so both sides train identical trials; ASHA's grace period is the
whole run, so no trial is stopped early), ``--concurrent`` at a time, one worker per trial. The only difference is
``--trial-runner ray-train`` versus ``--trial-runner in-process``. The disk feature cache is filled before either
side runs, so neither pays the one-time feature extraction.

The two sides alternate (old, new, old, new ... for ``--rounds`` rounds, each sweep in fresh folders), so load from
other processes on a shared machine hits both alike, and every figure is the median over the rounds (each round's own
figures are in ``--json``). Printed per side, from the sweep's own summary: trials per hour while trials run
(trials / the window from the first trial's creation to the last one's end: the rate a long sweep settles at) and
over the whole command (imports, Ray start-up and registration included: a sweep's fixed costs, alike on both sides,
which a short benchmark sweep cannot spread), the median per-trial overhead (the trial's wall time, from its creation
to its end, minus its training loop and evaluation) and where the time went; then the ratios. ``--json`` prints one
JSON line last, with ``ratio`` = new / old trials per hour.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit_json, fill_eurosat_feature_cache, machine, machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
TINY_VIT = "tests/fixtures/tiny-vit.json"
RUNNERS = ("ray-train", "in-process")  # old, new
PHASES = ("time_queue_s", "time_process_start_s", "time_model_s", "time_features_s", "time_train_loop_s",
          "time_eval_s", "time_report_s", "time_tracking_s", "time_trial_wall_s", "time_overhead_s")


def sweep_argv(args: argparse.Namespace, runner: str, work: Path) -> list[str]:
    n_ctx = ",".join(str(n) for n in range(1, args.trials + 1))  # distinct, identical on both sides
    return [
        "--dataset", "eurosat", "--data-root", str(args.data_root), "--backbone", str(REPO / TINY_VIT),
        "--pretrained", "none", "--shots", str(args.shots), "--epochs", str(args.epochs), "--n-views", "2",
        "--max-test-items", str(args.max_test_items), "--cache-dir", str(work / "cache"),
        "--grid", f"prompt.n_ctx={n_ctx}", "--fixed", "prompt.ctx_init", "--ctx-init", "",
        "--grace-period", str(args.epochs), "--max-concurrent", str(args.concurrent), "--trial-runner", runner,
        "--storage-path", str(work / f"ray-{runner}"), "--tracking-uri", f"sqlite:///{work / f'mlflow-{runner}.db'}",
        "--sweep-name", f"bench-{runner}", "--json",
    ]


def fill_feature_cache(args: argparse.Namespace, work: Path) -> None:
    """Fill the disk feature cache once, so neither side pays for the one-time extraction."""
    fill_eurosat_feature_cache(args.data_root, work / "cache", max_test_items=args.max_test_items, shots=args.shots,
                               epochs=args.epochs, n_views=2, backbone=str(REPO / TINY_VIT), timeout=args.timeout)


def run_side(args: argparse.Namespace, runner: str, work: Path, round_: int = 0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    argv = sweep_argv(args, runner, work)
    for flag in ("--storage-path", "--tracking-uri", "--sweep-name"):  # this round's own folders, store and name
        i = argv.index(flag) + 1
        argv[i] = f"{argv[i]}-r{round_}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "platform.tune", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{runner} sweep failed (exit {proc.returncode})")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    if summary["trials_finished"] != args.trials:
        raise SystemExit(f"{runner} sweep finished {summary['trials_finished']} of {args.trials} trials")
    timing = summary["timing"]
    return {
        "runner": runner, "trials": summary["trials"], "command_wall_s": wall, "sweep_wall_s": summary["wall_s"],
        "trials_per_hour": timing["trials_per_hour_running"],
        "trials_per_hour_command": 3600.0 * summary["trials"] / wall, "trials_window_s": timing["trials_window_s"],
        "median_overhead_s": timing["median_time_overhead_s"], "overhead_share": timing["overhead_share"],
        **{f"median_{k}": timing.get(f"median_{k}") for k in PHASES},
    }


def median_side(rounds: Sequence[dict]) -> dict:
    """One side over its rounds: the median of every figure (None where a round had none), and the rounds."""
    out: dict = {"runner": rounds[0]["runner"], "trials": rounds[0]["trials"]}
    for key in rounds[0]:
        if key in out:
            continue
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out | {"rounds": list(rounds)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--trials", type=int, default=8, help="trials per side (default: 8)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at a time (default: 2)")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-test-items", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2,
                        help="times to run the two sides, alternating (old, new, old, new, ...); medians are reported "
                             "(default: 2)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per side before giving up")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (2 trials of 2 epochs): checks the code path, its ratio is not the benchmark's")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.max_test_items, args.rounds = 2, 2, 100, 1
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not (args.data_root / "eurosat" / "2750").is_dir():
        parser.error(f"EuroSAT not found under {args.data_root} (see ../shared/data/README.md)")

    info = machine()
    with tempfile.TemporaryDirectory(prefix="coop-bench-sweep-") as tmp:
        work = Path(tmp)
        fill_feature_cache(args, work)
        rounds: dict[str, list[dict]] = {runner: [] for runner in RUNNERS}
        for r in range(args.rounds):
            for runner in RUNNERS:  # A B A B: each round runs the old path, then ours
                rounds[runner].append(run_side(args, runner, work, r))
        sides = {runner: median_side(rounds[runner]) for runner in RUNNERS}
    old, new = sides["ray-train"], sides["in-process"]
    ratio = new["trials_per_hour"] / old["trials_per_hour"]
    command_ratio = new["trials_per_hour_command"] / old["trials_per_hour_command"]
    overhead_ratio = old["median_overhead_s"] / new["median_overhead_s"] if new["median_overhead_s"] else None

    print(f"sweep throughput: {args.trials} EuroSAT trials ({args.shots}-shot, {args.epochs} epochs, tiny ViT), "
          f"{args.concurrent} at a time, each side on its own local Ray; {args.rounds} round(s) alternating the "
          "sides, medians")
    print(machine_line(info))
    print(f"{'median s per trial':<24}{'ray-train (old)':>16}{'in-process (new)':>18}")
    for key in PHASES:
        label = key.removeprefix("time_").removesuffix("_s").replace("_", " ")
        a, b = old[f"median_{key}"], new[f"median_{key}"]
        print(f"{label:<24}{a if a is not None else float('nan'):>16.2f}{b if b is not None else float('nan'):>18.2f}")
    print(f"{'overhead share %':<24}{100 * old['overhead_share']:>16.1f}{100 * new['overhead_share']:>18.1f}")
    print(f"{'trials window s':<24}{old['trials_window_s']:>16.1f}{new['trials_window_s']:>18.1f}")
    print(f"{'trials per hour':<24}{old['trials_per_hour']:>16.0f}{new['trials_per_hour']:>18.0f}")
    print(f"{'command wall s':<24}{old['command_wall_s']:>16.1f}{new['command_wall_s']:>18.1f}")
    a, b = old["trials_per_hour_command"], new["trials_per_hour_command"]
    print(f"{'  per hour, whole cmd':<24}{a:>16.0f}{b:>18.0f}")
    print(f"whole command (imports, Ray start-up, registration included: fixed costs of one sweep, alike on both "
          f"sides): {command_ratio:.1f}x")
    print(f"ratio (new / old trials per hour while trials run): {ratio:.1f}x (target >= 10x); median overhead per "
          f"trial {new['median_overhead_s']:.2f} s (target <= 2 s), {overhead_ratio:.1f}x less than the old path's "
          f"{old['median_overhead_s']:.2f} s")
    if args.json:
        emit_json({"benchmark": "sweep_throughput", "machine": info, "old": old, "new": new,
                   "median_overhead_s": new["median_overhead_s"], "overhead_ratio": overhead_ratio,
                   "rounds": args.rounds, "command_ratio": command_ratio, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
