"""1000 classes on 2 workers: class-sharded versus data-sharded text, peak memory per worker and step time.

CoOp's step is dominated by the text tower running every class prompt; at ImageNet's 1000 classes that is ~4.5 GB of
activations at ViT-B/16 (``bench/memory.py``). Data-parallel workers each still encode all 1000 prompts, so a second
worker splits only the (cheap) image batch. Class sharding (``coop_core.distributed.ClassSharding``) gives each worker
its share of the prompts and all-gathers the features. The shares are balanced by estimated cost, not count: a worker
runs its prompts cut at its own longest one, so the classes are sorted by prompt length and cut where the two
workers' activations are equal (at 1000 ImageNet names, 699 prompts of at most 21 tokens on one worker, 301 of up to
30 on the other). This script measures, in one run and on the same machine:

- one worker (``SingleProcess``),
- two workers, data-sharded (``TrainConfig(text_sharding="data")``),
- two workers, class-sharded in label order: each takes half of the classes as they come (500 + 500), so each still
  cuts its prompts at about the one worker's length -- the same prompt grouping as the one worker: what sharding
  alone buys,
- two workers, class-sharded as the platform does it (``text_sharding="class"``: sorted by length and cut where the
  costs are equal): sharding and length grouping together; the difference from the row above is length grouping's,

each worker a fresh subprocess with one torch thread (so a second worker brings its own core: the question is what
that core buys), gloo over a ``FileStore`` on this machine, running ``coop_core.engine.train`` itself: ViT-B/16 with
random weights, ImageNet's class names, a batch of 32 cached image features, CoOp's SGD. Each epoch is one step; the
first is a warm-up and the step time is the median of the rest. Peak memory is the worker's peak RSS after loading
the model (the kernel's mark is reset then, as in ``bench/memory.py``), so it includes the loaded model and the
process itself, which sharding cannot split. The runs' final contexts are compared: all three take the same steps.
Each worker also reports how many classes it encoded and the length its prompts were cut at.

``ratio`` = class-sharded peak RSS per worker (the larger of the two) / one-worker peak RSS, for the platform's
sharding; ``ratio_same_grouping`` the same for label-order shards (sharding alone). Targets: memory ratio <= 0.6 and
step-time ratio <= 0.7 at 2 workers. The runs alternate over ``--rounds`` rounds (A B C D A B C D ...) and each
timed figure is the median over the rounds and the timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    REPO,
    emit_json,
    imagenet_subset,
    machine,
    machine_line,
    peak_rss_kb,
    print_table,
    reset_peak_rss,
    rss_kb,
    tiny_clip_config,
    worker_env,
)

TARGET_MEMORY_RATIO = 0.6
TARGET_STEP_RATIO = 0.7
# (name, workers, text_sharding): the one-worker baseline first, then the 2-worker strategies; "class-label-order" is
# this benchmark's own: class shards in label order (no length grouping), to separate sharding from grouping.
RUNS = (("one worker", 1, "data"), ("2 workers, data-sharded", 2, "data"),
        ("2 workers, class-sharded in label order", 2, "class-label-order"),
        ("2 workers, class-sharded by length", 2, "class"))


def label_order_sharding(requested: str, model, dist):
    """Class shards in label order (contiguous, equal counts): the platform's class sharding without its length
    grouping; each worker still cuts its prompts at its own longest (``CoOpModel.text_features``)."""
    import torch

    from coop_core.distributed import ClassSharding

    n_cls = model.prompt_learner.eot_idx.shape[0]
    return ClassSharding(dist, tuple(torch.arange(n_cls).tensor_split(dist.world_size)))


def worker(args: argparse.Namespace) -> dict:
    """One rank of one run, in this (fresh) process: train ``args.steps`` one-step epochs, report memory and time."""
    import torch
    import torch.distributed as torch_dist
    import torch.nn.functional as F

    from coop_core.backbone import load_clip
    from coop_core.config import PromptConfig, TrainConfig
    from coop_core.distributed import SingleProcess, text_sharding_for
    from coop_core.engine import train
    from coop_core.features import CachedViews
    from coop_core.pipeline import build_model

    torch.set_num_threads(args.threads)
    if args.world_size > 1:
        from platform.distributed import TorchDistributed

        torch_dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                                      world_size=args.world_size, timeout=datetime.timedelta(minutes=30))
        dist = TorchDistributed(rank=args.rank, world_size=args.world_size)
    else:
        dist = SingleProcess()
    clip = load_clip(args.arch, "none")
    model = build_model(clip, imagenet_subset(args.n_cls, clip.tokenizer), PromptConfig(csc=args.context == "csc"),
                        seed=0)
    g = torch.Generator().manual_seed(0)
    embed_dim = model.text_encoder.text_projection.shape[-1]
    views = F.normalize(torch.randn(1, args.batch_size, embed_dim, generator=g), dim=-1)  # (1 view, b, d)
    labels = torch.randint(args.n_cls, (args.batch_size,), generator=g)
    label_order = args.text_sharding == "class-label-order"
    if label_order:
        import coop_core.engine

        coop_core.engine.text_sharding_for = label_order_sharding  # this process trains once, with these shards
    cfg = TrainConfig(epochs=args.steps, batch_size=args.batch_size, warmup_epochs=0,
                      text_sharding="class" if label_order else args.text_sharding)
    baseline_kb = rss_kb("VmRSS")
    reset = reset_peak_rss()
    history = train(model, CachedViews(views, labels), cfg, dist=dist)
    peak_kb = peak_rss_kb(reset)
    if args.rank == 0:
        torch.save(model.prompt_learner.ctx.detach(), args.ctx_out)
    sharding = (label_order_sharding if label_order else text_sharding_for)(cfg.text_sharding, model, dist)
    own = sharding.shards[args.rank] if sharding.name == "class" else torch.arange(args.n_cls)  # classes it encoded
    auto = text_sharding_for("auto", model, dist).name
    if args.world_size > 1:
        torch_dist.destroy_process_group()
    return {
        "rank": args.rank, "world_size": args.world_size, "text_sharding": sharding.name, "auto_would_pick": auto,
        "classes": len(own), "seq": int(model.prompt_learner.eot_idx[own].max()) + 1,
        "baseline_mb": baseline_kb / 1024, "peak_mb": peak_kb / 1024, "peak_reset": reset,
        "step_s": [h["epoch_time_s"] for h in history],
    }


def run(name: str, world_size: int, text_sharding: str, args: argparse.Namespace, arch: str, tmp: Path) -> dict:
    """Start the run's workers as subprocesses at once, wait for all, and summarise them."""
    # A fresh rendezvous file per run: gloo's FileStore cannot be joined again once a group has used it (a second
    # round on the same file waits forever).
    init_file = tmp / f"store-{text_sharding}-{world_size}-{time.monotonic_ns()}"
    ctx_out = tmp / f"ctx-{text_sharding}-{world_size}.pt"
    procs = []
    for rank in range(world_size):
        cmd = [sys.executable, "-m", "bench.many_classes", "--worker", "--rank", str(rank), "--world-size",
               str(world_size), "--text-sharding", text_sharding, "--init-file", str(init_file), "--ctx-out",
               str(ctx_out), "--arch", arch, "--n-cls", str(args.n_cls), "--batch-size", str(args.batch_size),
               "--context", args.context, "--steps", str(args.steps), "--threads", str(args.threads)]
        with open(tmp / f"{rank}.out", "w") as out, open(tmp / f"{rank}.err", "w") as err:  # files: pipes can fill
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=out, stderr=err))
    t0 = time.perf_counter()
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs):  # one failed: the others would wait for it in a collective
            for other in procs:
                if other.poll() is None:
                    other.kill()
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            err = (tmp / f"{rank}.err").read_text()
            raise RuntimeError(f"{name}: worker {rank} failed ({p.returncode}):\n{err[-3000:]}")
    workers = [json.loads((tmp / f"{rank}.out").read_text().strip().splitlines()[-1]) for rank in range(world_size)]
    timed = [w["step_s"][1:] or w["step_s"] for w in workers]  # the first step is the warm-up
    step_times = [max(ts) for ts in zip(*timed)]  # a step ends when its slowest worker ends it
    return {
        "step_times_s": step_times,
        "name": name, "workers": world_size, "text_sharding": workers[0]["text_sharding"],
        "auto_would_pick": workers[0]["auto_would_pick"],
        "peak_mb_per_worker": max(w["peak_mb"] for w in workers),
        "baseline_mb": max(w["baseline_mb"] for w in workers),
        "step_mb_per_worker": max(w["peak_mb"] - w["baseline_mb"] for w in workers),
        "step_s": statistics.median(step_times),
        "wall_s": wall, "ctx_file": str(ctx_out), "per_worker": workers,
        "classes_per_worker": [w["classes"] for w in workers], "seq_per_worker": [w["seq"] for w in workers],
    }


def merge_rounds(rounds: list[dict]) -> dict:
    """One configuration over the rounds: median step time (rounds alternate the configurations, so load from other
    processes hits them alike), the largest memory (it does not depend on load), every round's raw figures."""
    last = rounds[-1]
    keep = ("name", "workers", "text_sharding", "auto_would_pick", "ctx_file", "classes_per_worker", "seq_per_worker")
    return {k: last[k] for k in keep} | {
        "step_s": statistics.median(t for r in rounds for t in r["step_times_s"]),  # every timed step of every round
        "peak_mb_per_worker": max(r["peak_mb_per_worker"] for r in rounds),
        "baseline_mb": max(r["baseline_mb"] for r in rounds),
        "step_mb_per_worker": max(r["step_mb_per_worker"] for r in rounds),
        "rounds": [{k: v for k, v in r.items() if k != "ctx_file"} for r in rounds],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.many_classes",
        description="Peak memory per worker and step time of CoOp training with 1000 ImageNet classes (ViT-B/16 text "
        "tower, random weights): one worker vs two workers data-sharded vs two workers class-sharded, each worker a "
        "fresh subprocess with one torch thread, gloo between them. Needs ~13 GB of free memory (the two "
        "data-sharded workers each hold a full 1000-class step).",
        epilog="Example: python -m bench.many_classes --json   (about 2 minutes on 2 quiet cores)",
    )
    p.add_argument("--arch", default=None,
                   help="open_clip architecture or model-config JSON, e.g. a narrower text tower (default ViT-B-16; "
                   "--quick: a tiny 2-layer CLIP)")
    p.add_argument("--n-cls", type=int, default=None, help="classes (ImageNet names; default 1000, --quick 64)")
    p.add_argument("--context", choices=("unified", "csc"), default="unified",
                   help="unified context (default) or class-specific (CSC: more memory, no shared prefix)")
    p.add_argument("--batch-size", type=int, default=32, help="images (cached features) per global batch (default 32)")
    p.add_argument("--steps", type=int, default=3,
                   help="training steps per run; the first is a warm-up, the others are timed (default 3)")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the four runs this many times, alternating (A B C D A B C D), and take the median step "
                        "time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny CLIP, 64 classes (~40 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--text-sharding", choices=("data", "class", "class-label-order"), default="data",
                   help=argparse.SUPPRESS)
    p.add_argument("--init-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--ctx-out", default="", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1")
    args.n_cls = args.n_cls or (64 if args.quick else 1000)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="coop-bench-many-classes-") as tmp:
        arch = args.arch or (tiny_clip_config(tmp) if args.quick else "ViT-B-16")
        return report(args, arch, Path(tmp))


def report(args: argparse.Namespace, arch: str, tmp: Path) -> int:
    """Run the four configurations one after the other (alternating over the rounds), compare, print."""
    import torch

    info = machine() | {"torch_threads": args.threads}
    rounds = [[run(name, workers, sharding, args, arch, tmp) for name, workers, sharding in RUNS]
              for _ in range(args.rounds)]
    runs = [merge_rounds(list(same)) for same in zip(*rounds)]
    one = runs[0]
    one_ctx = torch.load(one["ctx_file"], weights_only=True)
    for r in runs:
        ctx = torch.load(r.pop("ctx_file"), weights_only=True)
        r["max_ctx_diff_vs_one_worker"] = float((ctx - one_ctx).abs().max())

    arch_name = Path(arch).stem if arch.endswith(".json") else arch
    print(f"CoOp training with {args.n_cls} ImageNet classes, {arch_name} (random weights), {args.context} context, "
          f"n_ctx=16, batch {args.batch_size} of cached features, fp32; {args.steps} steps per run (first = warm-up), "
          f"{args.threads} torch thread(s) per worker, gloo; {args.rounds} round(s)")
    print(machine_line(info))
    print_table(
        ["run", "text sharding", "peak MB per worker", "baseline MB", "step MB", "step s", "memory ratio",
         "step ratio", "max |ctx diff|"],
        [[r["name"], r["text_sharding"], r["peak_mb_per_worker"], r["baseline_mb"], r["step_mb_per_worker"],
          r["step_s"], r["peak_mb_per_worker"] / one["peak_mb_per_worker"], r["step_s"] / one["step_s"],
          r["max_ctx_diff_vs_one_worker"]] for r in runs],
    )
    data, plain, cls = runs[1], runs[2], runs[3]
    ratio = cls["peak_mb_per_worker"] / one["peak_mb_per_worker"]
    plain_ratio = plain["peak_mb_per_worker"] / one["peak_mb_per_worker"]
    plain_step_ratio = plain["step_s"] / one["step_s"]
    step_ratio = cls["step_s"] / one["step_s"]
    step_memory_ratio = cls["step_mb_per_worker"] / one["step_mb_per_worker"]
    data_ratio = data["peak_mb_per_worker"] / one["peak_mb_per_worker"]
    data_step_ratio = data["step_s"] / one["step_s"]
    print("baseline = RSS after loading the model (torch, open_clip, CLIP weights, prompt buffers), which every worker "
          "holds whatever the strategy; step = peak - baseline")
    halved = (one["baseline_mb"] + one["step_mb_per_worker"] / 2) / one["peak_mb_per_worker"]
    print(f"class-sharded / one worker: step memory per worker {step_memory_ratio:.3f}; with an exact halving of the "
          f"step, the peak ratio at 2 workers would be (baseline + step / 2) / (baseline + step) = {halved:.3f}")
    print(f"sharding alone (label-order shards, the one worker's prompt grouping) / one worker: peak memory per "
          f"worker {plain_ratio:.3f}, step time {plain_step_ratio:.3f}; workers encode "
          f"{' + '.join(map(str, plain['classes_per_worker']))} classes cut at "
          f"{' and '.join(map(str, plain['seq_per_worker']))} tokens")
    print(f"length grouping on top (by-length shards vs label-order shards): peak memory {ratio / plain_ratio:.3f}x, "
          f"step time {step_ratio / plain_step_ratio:.3f}x")
    print(f"class-sharded by length / one worker: peak memory per worker {ratio:.3f} (target <= {TARGET_MEMORY_RATIO}: "
          f"{'met' if ratio <= TARGET_MEMORY_RATIO else 'NOT met'}), step time {step_ratio:.3f} (target <= "
          f"{TARGET_STEP_RATIO}: {'met' if step_ratio <= TARGET_STEP_RATIO else 'NOT met'})")
    print(f"class-sharded workers encode {' + '.join(map(str, cls['classes_per_worker']))} classes, prompts cut at "
          f"{' and '.join(map(str, cls['seq_per_worker']))} tokens (one worker: {one['seq_per_worker'][0]})")
    print(f"data-sharded / one worker: peak memory per worker {data_ratio:.3f}, step time {data_step_ratio:.3f}; "
          f"TrainConfig(text_sharding='auto') picks {cls['auto_would_pick']!r} sharding here")
    if args.quick:
        print("(--quick: a tiny CLIP, a smoke run; the ratios are not the benchmark's)")
    if args.json:
        emit_json({
            "benchmark": "many_classes",
            "ratio": ratio,
            "ratio_definition": f"peak RSS per worker, 2 workers class-sharded / 1 worker, {args.n_cls} classes, "
            f"{args.context} context",
            "step_time_ratio": step_ratio,
            "ratio_same_grouping": plain_ratio,
            "step_time_ratio_same_grouping": plain_step_ratio,
            "length_grouping_memory_factor": ratio / plain_ratio,
            "length_grouping_step_time_factor": step_ratio / plain_step_ratio,
            "step_memory_ratio": step_memory_ratio,
            "ratio_if_step_halved": halved,
            "data_sharded_memory_ratio": data_ratio,
            "data_sharded_step_time_ratio": data_step_ratio,
            "targets": {"ratio": TARGET_MEMORY_RATIO, "step_time_ratio": TARGET_STEP_RATIO},
            "auto_picks": cls["auto_would_pick"],
            "class_sharded_classes_per_worker": cls["classes_per_worker"],
            "class_sharded_seq_per_worker": cls["seq_per_worker"],
            "n_cls": args.n_cls, "context": args.context, "arch": arch_name, "steps": args.steps, "rounds": args.rounds,
            "runs": runs,
            "quick": args.quick,
            "machine": info,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
