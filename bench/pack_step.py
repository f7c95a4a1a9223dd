"""Training many configurations: one after the other (``coop_core.engine.train``) versus as one pack
(``coop_core.pack.train_pack``: one text-encoder pass per step over every configuration's prompts, one CLIP).

The training loop only, in one process, on cached image features: the same fixed configurations on both sides
(``n_ctx`` 4/8/16, the three class-token positions, unified and class-specific contexts, four learning rates: the
first ``--configs`` of their product), EuroSAT's ten class names, 16 shots per class and CoOp's batch size 32, for
``--epochs`` epochs. The features are random unit vectors of the backbone's width: a step's cost does not depend on
their values (and with random-weight CLIPs, real images would be no more meaningful). For (i) the tests' tiny ViT
and (ii) ViT-B/16's text tower (random weights). The two sides alternate over ``--rounds`` rounds (A B A B) and the
median is reported; both sides' final contexts are compared (a pack member's trajectory is its solo run's, up to
float rounding).

This measures what packing does to the step; what it does to a whole sweep command (Ray, MLflow, Tune's
per-trial costs on top) is the sweep's own benchmark, once the sweep packs its trials (issue 18).

``--json`` prints one JSON line last with ``ratio_tiny`` and ``ratio_vitb16`` (configurations per hour, pack / one
by one).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import EUROSAT_CLASSNAMES, REPO, emit_json, machine, machine_line, set_threads  # noqa: E402
from coop_core.backbone import load_clip  # noqa: E402
from coop_core.config import PromptConfig, TrainConfig  # noqa: E402
from coop_core.engine import train  # noqa: E402
from coop_core.features import CachedViews  # noqa: E402
from coop_core.model import CoOpModel  # noqa: E402
from coop_core.pack import PackMember, train_pack  # noqa: E402

BACKBONES = {"tiny": str(REPO / "tests" / "fixtures" / "tiny-vit.json"), "vitb16": "ViT-B-16"}
LRS = (0.0005, 0.001, 0.002, 0.004)


def configurations(n: int) -> list[tuple[PromptConfig, float]]:
    """The first ``n`` of n_ctx x position x csc x lr, in a fixed order that varies every field early."""
    grid = itertools.product((False, True), ("end", "middle", "front"), (4, 8, 16), LRS)
    ordered = sorted(grid, key=lambda c: (LRS.index(c[3]), c[2], c[1], c[0]))  # lr cycles slowest
    picked = [ordered[i] for i in range(0, len(ordered), max(1, len(ordered) // n))][:n]
    return [(PromptConfig(n_ctx=n_ctx, class_token_position=pos, csc=csc), lr) for csc, pos, n_ctx, lr in picked]


def members(clip, configs, shots: int, epochs: int, seed: int) -> list[PackMember]:
    n_cls, d = len(EUROSAT_CLASSNAMES), clip.model.text_projection.shape[-1]
    out = []
    for i, (prompt, lr) in enumerate(configs):
        g = torch.Generator().manual_seed(seed + i)
        n = shots * n_cls
        views = F.normalize(torch.randn(1, n, d, generator=g), dim=-1)
        labels = torch.arange(n_cls).repeat_interleave(shots)
        model = CoOpModel(clip.model, clip.tokenizer, EUROSAT_CLASSNAMES, prompt, generator=g)
        cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=32, seed=seed + i, warmup_epochs=1, n_views=1)
        out.append(PackMember(model, CachedViews(views, labels, seed=seed + i), cfg))
    return out


def one_by_one(ms: Sequence[PackMember]) -> list[torch.Tensor]:
    for m in ms:
        train(m.model, m.data, m.cfg)
    return [m.model.prompt_learner.ctx.detach().clone() for m in ms]


def packed(ms: Sequence[PackMember]) -> list[torch.Tensor]:
    results = train_pack(ms)
    assert all(r.failure is None for r in results)
    return [m.model.prompt_learner.ctx.detach().clone() for m in ms]


def measure(name: str, args: argparse.Namespace) -> dict:
    clip = load_clip(BACKBONES[name], "none")
    configs = configurations(args.configs)
    times: dict[str, list[float]] = {"one by one": [], "pack": []}
    contexts = {}
    for _ in range(args.rounds):
        for side, fn in (("one by one", one_by_one), ("pack", packed)):
            ms = members(clip, configs, args.shots, args.epochs, seed=1)  # the same initial contexts every time
            t0 = time.perf_counter()
            contexts[side] = fn(ms)
            times[side].append(time.perf_counter() - t0)
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(contexts["pack"], contexts["one by one"]))
    solo, pack = statistics.median(times["one by one"]), statistics.median(times["pack"])
    return {"backbone": name, "configs": len(configs), "epochs": args.epochs, "shots": args.shots,
            "one_by_one_s": solo, "pack_s": pack, "rounds": times,
            "configs_per_hour_one_by_one": 3600 * len(configs) / solo,
            "configs_per_hour_pack": 3600 * len(configs) / pack,
            "ratio": solo / pack, "max_ctx_diff_relative": worst}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pack_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=32, help="configurations (default 32)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per configuration (default 20)")
    p.add_argument("--shots", type=int, default=16, help="training items per class (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two sides (default 2)")
    p.add_argument("--backbones", nargs="+", choices=tuple(BACKBONES), default=list(BACKBONES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 configurations, 2 epochs, 1 round, tiny only")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.epochs, args.rounds, args.backbones = 4, 2, 1, ["tiny"]
    threads = set_threads(args.threads)
    info = machine() | {"torch_threads": threads}
    rows = [measure(name, args) for name in args.backbones]
    print(f"{args.configs} CoOp configurations (n_ctx 4/8/16, end/middle/front, unified/CSC, 4 lrs), EuroSAT's 10 "
          f"classes, {args.shots} shots, batch 32, {args.epochs} epochs, cached features; the training loop only; "
          f"{args.rounds} alternating round(s), medians")
    print(machine_line(info))
    print(f"{'backbone':<10}{'one by one s':>14}{'pack s':>10}{'configs/h one by one':>22}{'configs/h pack':>16}"
          f"{'ratio':>8}{'max ctx diff':>14}")
    for r in rows:
        print(f"{r['backbone']:<10}{r['one_by_one_s']:>14.1f}{r['pack_s']:>10.1f}"
              f"{r['configs_per_hour_one_by_one']:>22.0f}{r['configs_per_hour_pack']:>16.0f}{r['ratio']:>7.2f}x"
              f"{r['max_ctx_diff_relative']:>14.2e}")
    if args.quick:
        print("(--quick: a smoke run; the ratios are not the benchmark's)")
    if args.json:
        out = {"benchmark": "pack_step", "machine": info, "rows": rows, "quick": args.quick}
        for r in rows:
            out[f"ratio_{r['backbone']}"] = r["ratio"]
        emit_json(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
