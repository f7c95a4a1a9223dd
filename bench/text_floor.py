"""Our text forward+backward against its compute floor on this machine.

The work: CoOp's text path for EuroSAT's 10 class prompts (n_ctx=16, class token at the end) through the ViT-B/16
text tower (width 512, 12 layers, 8 heads), forward and backward to the context, as ``CoOpModel.text_features`` runs it:
truncated after the longest end-of-text token (23 of 77 positions) and with the 17 positions every prompt shares
(start token + unified context) computed once, i.e. ``17 + 10 x 6 = 77`` token rows instead of ``10 x 23 = 230``. The
floor: its FLOPs divided by this machine's fp32 matmul throughput at the transformer's own shapes.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the actual forward+backward (with torch's own SDPA
formulas for the CPU flash-attention kernels, which it does not count) and cross-checked analytically, for ``T`` token
rows, a shared prefix of ``p`` positions and ``r = seq - p`` per-class positions:

- forward, per layer: QKV ``2*w*3w`` + out-projection ``2*w*w`` + MLP ``2*w*4w + 2*4w*w`` = ``24*w^2`` per row;
  attention ``4*w`` per (query, key) pair: ``p*p`` pairs for the prefix, ``n*r*(p + r)`` for the rest.
- backward: CLIP is frozen, so autograd computes only input gradients (no weight gradients): each linear layer costs
  one more matmul of its forward size (2x forward in total, not 3x). The attention core needs the gradients of Q, K
  and V (all depend on the context) and the flash kernel recomputes the scores: 2.5x its forward.
- ``ln_final`` and the projection act on the ``n`` end-of-text features only (``2*w*d`` forward + backward).

The throughput is measured in the same run, interleaved with the text steps, by replaying exactly the transformer's
matmuls: for each layer the four forward ``addmm(bias, x, W.T)`` and the four input-gradient ``mm(grad, W)``, with the
model's own weights and ``T`` rows. For comparison the script also times the truncated path without the shared prefix
and open_clip's stock blocks on the truncated input (each against its own floor), and profiles our step.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from bench._common import (  # noqa: E402
    EUROSAT_CLASSNAMES,
    emit_json,
    interleaved,
    machine,
    machine_line,
    paired_ratio,
    print_table,
    reference_text_features,
    set_threads,
)
from coop_core.backbone import load_clip  # noqa: E402
from coop_core.config import PromptConfig  # noqa: E402
from coop_core.model import CoOpModel  # noqa: E402

TARGET_RATIO = 1.5

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FlopCounterMode has formulas for the CUDA SDPA kernels only; the CPU flash kernels do the same matmuls.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}

PROFILE_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention core", ("aten::_scaled_dot_product",)),
    ("layer norm", ("aten::native_layer_norm",)),
    ("GELU", ("aten::gelu",)),
    ("copies / fills / adds", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::add", "aten::clone",
                               "aten::cat", "aten::index", "aten::mul", "aten::sum", "aten::contiguous")),
)


def count_flops(step: Callable[[], None]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``step`` by operator (FlopCounterMode plus the CPU SDPA kernels)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with counter:
        step()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def analytic_flops(n: int, seq: int, prefix: int, width: int, layers: int, embed_dim: int) -> dict[str, int]:
    """Forward + input-gradient FLOPs of the frozen text transformer (see the module docstring); prefix 0: none."""
    rest = seq - prefix
    tokens = prefix + n * rest
    pairs = prefix * prefix + n * rest * (prefix + rest)  # (query, key) pairs the dense attention kernels compute
    linear = 24 * width * width * tokens * layers  # forward
    attention = 4 * width * pairs * layers  # forward: scores + weighted values, all heads
    head = 2 * width * embed_dim * n  # projection of the n EOT features
    return {
        "linear_fwd": linear, "linear_bwd": linear,
        "attention_fwd": attention, "attention_bwd": int(2.5 * attention),  # dQ, dK, dV, dP + score recompute
        "projection_fwd_bwd": 2 * head,
        "total": 2 * linear + int(3.5 * attention) + 2 * head,
        "tokens": tokens,
    }


def matmul_replay(model: CoOpModel, tokens: int) -> tuple[Callable[[], None], int]:
    """The text transformer's matmuls alone (forward and input-gradient, model weights); returns (fn, FLOPs)."""
    calls: list[tuple[Callable, tuple]] = []
    flops = 0
    inputs: dict[int, torch.Tensor] = {}

    def rows(k: int) -> torch.Tensor:
        if k not in inputs:
            inputs[k] = torch.randn(tokens, k)
        return inputs[k]

    for block in model.text_encoder.transformer.resblocks:
        linears = [(block.attn.in_proj_weight, block.attn.in_proj_bias), (block.attn.out_proj.weight,
                   block.attn.out_proj.bias), (block.mlp.c_fc.weight, block.mlp.c_fc.bias),
                   (block.mlp.c_proj.weight, block.mlp.c_proj.bias)]
        for w, b in linears:
            out_f, in_f = w.shape
            calls.append((torch.addmm, (b, rows(in_f), w.t())))  # forward: (T, in) @ (in, out) + bias
            calls.append((torch.mm, (rows(out_f), w)))  # input gradient: (T, out) @ (out, in)
            flops += 2 * 2 * tokens * in_f * out_f

    def run() -> None:
        with torch.no_grad():
            for fn, args in calls:
                fn(*args)

    return run, flops


def profile_step(step: Callable[[], None], steps: int) -> tuple[list[tuple[str, float]], list[tuple[str, float, int]]]:
    """Share of self CPU time by operator group, and the top operators, over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        name = next((g for g, prefixes in PROFILE_GROUPS if e.key.startswith(prefixes)), "other")
        groups[name] += e.self_cpu_time_total
    shares = sorted(((g, t / total) for g, t in groups.items()), key=lambda x: -x[1])
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return shares, [(e.key, e.self_cpu_time_total / total, e.count // steps) for e in top]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.text_floor",
        description="Compare our truncated text forward+backward (EuroSAT 10 classes, n_ctx=16, ViT-B/16 text tower) "
        "with its compute floor: counted FLOPs / this machine's fp32 matmul throughput at the same shapes, measured "
        "in the same run. Also times open_clip's stock blocks on the same truncated input, and profiles our step.",
        epilog="Example: python -m bench.text_floor --json   (about 1 minute on 2 cores)",
    )
    p.add_argument("--arch", default="ViT-B-16", help="open_clip architecture or model-config JSON (default ViT-B-16)")
    p.add_argument("--n-ctx", type=int, default=16, help="context tokens (default 16)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 15; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick: 0)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="steps profiled with torch.profiler (default 3; 0 turns profiling off; --quick: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="CI smoke run in seconds: 2 rounds, no profile")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reps = args.reps or (2 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    profile_steps = args.profile_steps if args.profile_steps is not None else (0 if args.quick else 3)
    set_threads(args.threads)
    clip = load_clip(args.arch, "none")
    model = CoOpModel(clip.model, clip.tokenizer, EUROSAT_CLASSNAMES, PromptConfig(n_ctx=args.n_ctx),
                      truncate_text=True, generator=torch.Generator().manual_seed(0))
    te, pl = model.text_encoder, model.prompt_learner
    n = pl.n_cls
    seq = int(pl.eot_idx.max()) + 1
    prefix = model.shared_prefix
    width = te.positional_embedding.shape[1]
    layers = len(te.transformer.resblocks)
    embed_dim = model.text_features().shape[1]
    weight = torch.randn(n, embed_dim, generator=torch.Generator().manual_seed(1))  # a fixed loss direction

    def backward(features: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            pl.ctx.grad = None
            (features() * weight).sum().backward()
        return step

    variants = {  # name -> (step, shared prefix used)
        "ours": (backward(model.text_features), prefix),
        "truncated only": (backward(lambda: F.normalize(te(pl(), pl.eot_idx), dim=-1)), 0),
        "open_clip blocks": (backward(lambda: reference_text_features(model, truncate=True)), 0),
    }
    with torch.no_grad():
        max_abs_diff = float((model.text_features() - reference_text_features(model, truncate=False)).abs().max())
    flops = {name: count_flops(step) for name, (step, _) in variants.items()}
    analytic = {name: analytic_flops(n, seq, p, width, layers, embed_dim) for name, (_, p) in variants.items()}
    replays = {}
    for rows in sorted({a["tokens"] for a in analytic.values()}):
        replays[rows] = matmul_replay(model, rows)
    fns = {name: step for name, (step, _) in variants.items()} | {f"matmuls x{r}": fn for r, (fn, _) in replays.items()}
    timings = interleaved(fns, reps=reps, warmup=warmup)
    info = machine()

    rows_out = []
    results = {}
    for name in variants:
        total, by_op = flops[name]
        rows = analytic[name]["tokens"]
        mm_t, mm_flops = timings[f"matmuls x{rows}"], replays[rows][1]
        gflops, gflops_best = mm_flops / mm_t.median / 1e9, mm_flops / mm_t.min / 1e9
        floor, floor_best = total / (gflops * 1e9), total / (gflops_best * 1e9)
        t = timings[name]
        results[name] = {
            "flops": total, "flops_by_op": by_op, "flops_analytic": analytic[name]["total"], "tokens": rows,
            "matmul_gflops": gflops, "matmul_gflops_best": gflops_best, "floor_s": floor, "floor_best_s": floor_best,
            "time": t.as_dict(), "ratio": t.median / floor, "ratio_best": t.min / floor_best,
            "ratio_paired": paired_ratio(t, mm_t, den_scale=total / mm_flops),  # a round's floor: its replay, scaled
        }
        rows_out.append([name, rows, total / 1e9, analytic[name]["total"] / 1e9, gflops, floor, t.median,
                         f"{t.median / floor:.2f}x", f"{results[name]['ratio_paired']:.2f}x",
                         f"{t.min / floor_best:.2f}x"])
    ours = results["ours"]
    ratio = ours["ratio"]

    print(f"Text forward+backward: {args.arch} text tower (width {width}, {layers} layers), {n} EuroSAT prompts, "
          f"n_ctx={args.n_ctx}, truncated to {seq} of 77 positions, shared prefix {prefix}, fp32; median of {reps} "
          f"interleaved rounds")
    print(machine_line(info))
    print("FLOPs: FlopCounterMode on the real fwd + input-grad bwd (analytic count beside it); floor = FLOPs / "
          "GFLOP/s of the same matmuls replayed at the same row count, in the same rounds")
    print_table(
        ["variant", "rows", "GFLOP", "analytic", "matmul GFLOP/s", "floor s", "time s", "x floor", "paired",
         "best/best"],
        rows_out,
    )
    print(f"ours by op: {', '.join(f'{k} {v / 1e9:.3f}' for k, v in sorted(ours['flops_by_op'].items()))} GFLOP")
    print(f"ours / floor = {ratio:.2f}x median ({ours['ratio_paired']:.2f}x paired per round, "
          f"{ours['ratio_best']:.2f}x best/best); target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}. Ours vs 77-token open_clip features: max |diff| "
          f"{max_abs_diff:.1e}")
    shares: list = []
    top: list = []
    if profile_steps:
        shares, top = profile_step(variants["ours"][0], profile_steps)
        print(f"profile of ours (torch.profiler, {profile_steps} steps, share of self CPU time):")
        print_table(["op group", "share"], [[g, f"{s:.1%}"] for g, s in shares])
        print_table(["top ops", "share", "calls/step"], [[k, f"{s:.1%}", c] for k, s, c in top])
    if args.quick:
        print("(--quick: two rounds, a smoke run; the ratio is not the benchmark's)")
    if args.json:
        emit_json({
            "benchmark": "text_floor",
            "ratio": ratio,
            "ratio_definition": "our text fwd+bwd time / (its counted FLOPs / measured matmul GFLOP/s at its shapes), "
            "medians",
            "ratio_paired": ours["ratio_paired"],
            "ratio_best": ours["ratio_best"],
            "target_ratio": TARGET_RATIO,
            "variants": results,
            "seq": seq,
            "shared_prefix": prefix,
            "n_cls": n,
            "max_abs_diff_vs_77": max_abs_diff,
            "profile_shares": dict(shares),
            "quick": args.quick,
            "machine": info,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
