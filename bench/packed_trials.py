"""Packed trials: the same sweep of fixed configurations with one configuration per trial (``--pack-size 1``) and
with automatic packing (``--pack-size auto``), whole sweep commands side by side.

Both sides run ``python -m platform.tune`` itself, each in its own process with its own local Ray (all of this
machine's CPUs), on real EuroSAT from ``../shared/data``, 16 shots: a ``--grid`` of 36 configurations -- ``n_ctx``
4/8/16, the three class-token positions, unified and CSC, two learning rates (a full grid: the issue's "32
configurations" with four learning rates is not a grid, and a grid is what both sides can be given identically) --
``--epochs`` each (default 20), ``--concurrent`` trials at a time. ASHA's grace period is the whole run, so no
configuration is stopped early and both sides train exactly the same steps. The disk feature cache is filled before
either side runs.

For each backbone (``--models``): ``tiny`` (the tests' tiny ViT) and ``vitb16`` (ViT-B/16 with random weights:
its text tower is what a step costs; the cached image features have its width). The sides alternate (solo, packed,
solo, packed ... for ``--rounds`` rounds) and every figure is the median over the rounds. Printed per side:
configurations per hour of the whole command, the training loop's share of its wall time, and the peak memory of
the command's process tree (driver, Ray and trial processes: sampled from ``/proc``) per configuration in flight
(``--concurrent`` for solo trials; every member of the packs in flight for packed ones). ``--json`` prints one JSON
line last, with ``ratio_tiny`` and ``ratio_vitb16`` (packed / solo configurations per hour) last.

Each round also times the same command for one configuration and one epoch: the cost of any sweep command whatever it
trains (imports, Ray's start and stop, the MLflow store, registration, dashboards; about 25 s on a 2-core machine),
which both sides pay once. ``ratio_beyond_floor`` is the ratio of the two walls less that floor: what packing does to
the part of the command that grows with the sweep. ``--epochs 200`` is CoOp's own schedule for 16 shots.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit_json, fill_eurosat_feature_cache, machine, machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
BACKBONES = {"tiny": str(REPO / "tests" / "fixtures" / "tiny-vit.json"), "vitb16": "ViT-B-16"}
GRID = ("prompt.n_ctx=4,8,16", "prompt.class_token_position=end,middle,front", "prompt.csc=false,true",
        "train.lr=0.002,0.02")
N_CONFIGS = 3 * 3 * 2 * 2
SIDES = ("1", "auto")  # --pack-size: solo, packed

class TreeMemory:
    """Peak resident memory of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree_rss(self) -> int:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                statm = Path(f"/proc/{entry}/statm").read_text().split()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
            rss[int(entry)] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
        total, todo = 0, [self.pid]
        while todo:
            p = todo.pop()
            total += rss.get(p, 0)
            todo.extend(children.get(p, []))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(self.interval)


def sweep_argv(args: argparse.Namespace, model: str, side: str, work: Path, round_: int) -> list[str]:
    tag = f"{model}-p{side}-r{round_}"
    return [
        "--dataset", "eurosat", "--data-root", str(args.data_root), "--backbone", BACKBONES[model],
        "--pretrained", "none", "--shots", str(args.shots), "--epochs", str(args.epochs), "--n-views", "1",
        "--warmup-epochs", "0", "--max-test-items", str(args.max_test_items), "--cache-dir", str(work / "cache"),
        "--grid", *GRID, "--fixed", "prompt.ctx_init", "--ctx-init", "", "--grace-period", str(args.epochs),
        "--max-concurrent", str(args.concurrent), "--pack-size", side,
        "--storage-path", str(work / f"ray-{tag}"), "--tracking-uri", f"sqlite:///{work / f'mlflow-{tag}.db'}",
        "--sweep-name", f"bench-{tag}", "--json",
    ]


def run_side(args: argparse.Namespace, model: str, side: str, work: Path, round_: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "platform.tune", *sweep_argv(args, model, side, work, round_)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid) as memory:
        out, err = proc.communicate(timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(out[-3000:] + err[-5000:])
        raise SystemExit(f"{model} --pack-size {side} sweep failed (exit {proc.returncode})")
    summary = json.loads(out.strip().splitlines()[-1])
    if summary["trials_finished"] != N_CONFIGS:
        raise SystemExit(f"{model} --pack-size {side}: {summary['trials_finished']} of {N_CONFIGS} finished")
    pack = int(summary["pack_size"])
    in_flight = min(N_CONFIGS, args.concurrent * pack)
    loop = summary["timing"]["total_time_train_loop_s"]
    if pack > 1:  # each member reports its pack's epoch time: the pack's loop is one member's, per pack
        loop /= pack
    return {"side": side, "pack_size": pack, "command_wall_s": wall, "configs_per_hour": 3600.0 * N_CONFIGS / wall,
            "train_loop_share": loop / (wall * args.concurrent), "peak_rss_bytes": memory.peak,
            "peak_rss_per_config_bytes": memory.peak / in_flight}


def floor_s(args: argparse.Namespace, model: str, work: Path) -> float:
    """Wall time of the same command for one configuration and one epoch: what every sweep command costs whatever
    it trains (imports, Ray, the MLflow store, registration, dashboards), which packing cannot change."""
    argv = sweep_argv(args, model, "1", work, -1)
    grid = argv.index("--grid")
    argv[grid + 1:grid + 1 + len(GRID)] = ["prompt.n_ctx=4"]
    argv[argv.index("--epochs") + 1] = argv[argv.index("--grace-period") + 1] = "1"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "platform.tune", *argv], cwd=REPO, env=env, capture_output=True,
                   check=True, timeout=args.timeout)
    return time.perf_counter() - t0


def median_side(rounds: Sequence[dict]) -> dict:
    out: dict = {"side": rounds[0]["side"], "pack_size": rounds[0]["pack_size"]}
    for key in rounds[0]:
        if key not in out:
            out[key] = statistics.median(r[key] for r in rounds)
    return out | {"rounds": list(rounds)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--concurrent", type=int, default=2, help="trials at a time (default: 2)")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-test-items", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per backbone; medians (default: 1)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per sweep before giving up")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not (args.data_root / "eurosat" / "2750").is_dir():
        parser.error(f"EuroSAT not found under {args.data_root} (see ../shared/data/README.md)")

    info = machine()
    print(f"packed trials: {N_CONFIGS} EuroSAT configurations ({args.shots}-shot, {args.epochs} epochs), "
          f"{args.concurrent} trials at a time, --pack-size 1 vs auto, whole sweep commands; {args.rounds} round(s)")
    print(machine_line(info))
    results: dict[str, dict] = {}
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix=f"coop-bench-packed-{model}-") as tmp:
            work = Path(tmp)
            fill_eurosat_feature_cache(args.data_root, work / "cache", max_test_items=args.max_test_items,
                                       shots=args.shots, epochs=args.epochs, n_views=1, backbone=BACKBONES[model],
                                       timeout=args.timeout)
            rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
            floors = []
            for r in range(args.rounds):
                for side in SIDES:
                    rounds[side].append(run_side(args, model, side, work, r))
                floors.append(floor_s(args, model, work))
        solo, packed = (median_side(rounds[s]) for s in SIDES)
        ratio = packed["configs_per_hour"] / solo["configs_per_hour"]
        floor = statistics.median(floors)
        beyond = (solo["command_wall_s"] - floor) / max(packed["command_wall_s"] - floor, 1e-9)
        results[model] = {"solo": solo, "packed": packed, "floor_s": floor, "ratio_beyond_floor": beyond,
                          "ratio": ratio}
        print(f"\n{model} ({BACKBONES[model]}): auto pack size {packed['pack_size']}")
        print(f"{'':<34}{'--pack-size 1':>16}{'--pack-size auto':>18}")
        print(f"{'command wall s':<34}{solo['command_wall_s']:>16.1f}{packed['command_wall_s']:>18.1f}")
        print(f"{'configurations per hour':<34}{solo['configs_per_hour']:>16.0f}{packed['configs_per_hour']:>18.0f}")
        print(f"{'training loop share of wall %':<34}{100 * solo['train_loop_share']:>16.1f}"
              f"{100 * packed['train_loop_share']:>18.1f}")
        print(f"{'peak memory per configuration MB':<34}{solo['peak_rss_per_config_bytes'] / 1e6:>16.0f}"
              f"{packed['peak_rss_per_config_bytes'] / 1e6:>18.0f}")
        print(f"one configuration, one epoch (the command's fixed cost): {floor:.1f} s")
        print(f"ratio (packed / solo configurations per hour): {ratio:.2f}x; beyond the fixed cost: {beyond:.2f}x")
    if args.json:
        out = {"benchmark": "packed_trials", "machine": info, "configs": N_CONFIGS, "epochs": args.epochs,
               "shots": args.shots, "concurrent": args.concurrent, "rounds": args.rounds, "results": results}
        out |= {f"ratio_{m}": results[m]["ratio"] if m in results else None for m in BACKBONES}
        emit_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
