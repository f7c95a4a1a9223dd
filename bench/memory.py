"""Peak memory of one CoOp training step with 1000 classes (ImageNet-sized): truncated vs 77-token text, unified vs CSC.

What a step holds: the frozen CLIP weights, the prompt learner's fixed buffers, the learned context (plus its gradient
and SGD momentum), and above all the text transformer's activations kept for backward, which grow with
``token rows * width * layers``: every class prompt goes through the whole text tower at every step. The reference
runs ``n_cls * 77`` rows; ours runs the start token + unified context once and ``n_cls * (seq - shared)`` rows after it
(ImageNet with n_ctx=16: 17 + 1000 x 13 rows instead of 1000 x 77). Class-specific context (CSC) adds only
``n_cls * n_ctx * width`` floats three times (context, gradient, momentum), but its prompts share only the start
token, so it runs 1000 x 30 rows.

Method: each configuration runs in a fresh subprocess (ViT-B/16 text tower, random weights, cached image features of
a batch of 32), which resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) after loading the model and
reports the peak RSS (``VmHWM``) reached by one step (forward, backward, SGD step) and the bytes of the tensors
autograd saved for backward. A 1000-class step takes many minutes on 2 cores and, at 77 tokens, more memory than a
shared machine should be asked for, so the step is measured at two smaller class counts and extrapolated linearly to
1000 (memory is affine in the number of classes at a fixed sequence length: the subsets always contain ImageNet's
longest class name, so the truncated length is the 1000-class one). ``--direct`` measures 1000 classes for real.
"""

from __future__ import annotations

import argparse
import json
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
    set_threads,
    tiny_clip_config,
    worker_env,
)

TARGET_N_CLS = 1000
MB = 2**20
CONFIGS = (("truncated", "unified"), ("truncated", "csc"), ("full", "unified"), ("full", "csc"))


def worker(n_cls: int, csc: bool, truncate: bool, arch: str, batch: int) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch
    import torch.nn.functional as F

    from coop_core.backbone import load_clip
    from coop_core.config import PromptConfig, TrainConfig
    from coop_core.engine import make_optimizer
    from coop_core.model import CoOpModel

    clip = load_clip(arch, "none")
    names = imagenet_subset(n_cls, clip.tokenizer)
    model = CoOpModel(clip.model, clip.tokenizer, names, PromptConfig(csc=csc), truncate_text=truncate,
                      generator=torch.Generator().manual_seed(0))
    opt, _ = make_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(0)
    embed_dim = model.text_encoder.text_projection.shape[-1]
    feats = F.normalize(torch.randn(batch, embed_dim, generator=g), dim=-1)  # cached image features (b, d)
    labels = torch.randint(n_cls, (batch,), generator=g)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()  # saved tensors stay alive until backward, so a storage's address identifies it
        saved[s._cdata] = s.nbytes()
        return t

    baseline_kb = rss_kb("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model.forward_features(feats)  # (b, n_cls)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    elapsed = time.perf_counter() - t0
    peak_kb = peak_rss_kb(reset)
    ctx = model.prompt_learner.ctx
    seq = int(model.prompt_learner.eot_idx.max()) + 1 if truncate else model.prompt_learner.tokenized_prompts.shape[1]
    frozen = sum(p.numel() * p.element_size() for p in clip.model.parameters())
    text_weights = sum(p.numel() * p.element_size() for p in model.text_encoder.transformer.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.prompt_learner.buffers())
    return {
        "n_cls": n_cls, "csc": csc, "truncate": truncate,
        "seq": seq,
        "shared_prefix": model.shared_prefix if truncate else 0,
        "baseline_mb": baseline_kb / 1024, "peak_mb": peak_kb / 1024, "step_mb": (peak_kb - baseline_kb) / 1024,
        "peak_reset": reset,
        "saved_for_backward_mb": sum(saved.values()) / MB,
        "saved_text_weights_mb": text_weights / MB,
        "ctx_state_mb": 3 * ctx.numel() * ctx.element_size() / MB,  # context + gradient + momentum
        "clip_weights_mb": frozen / MB,
        "prompt_buffers_mb": buffers / MB,
        "step_s": elapsed,
    }


def run_worker(n_cls: int, csc: bool, truncate: bool, arch: str, batch: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--worker", "--n-cls", str(n_cls), "--arch", arch,
           "--batch-size", str(batch), "--context", "csc" if csc else "unified",
           "--text", "truncated" if truncate else "full"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extrapolate(a: dict, b: dict, key: str, n: int) -> float:
    """Value of ``key`` at ``n`` classes on the line through measurements ``a`` and ``b``."""
    slope = (b[key] - a[key]) / (b["n_cls"] - a["n_cls"])
    return b[key] + slope * (n - b["n_cls"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description="Peak memory (RSS) of one CoOp training step for 1000 ImageNet classes with the ViT-B/16 text "
        "tower: truncated vs full 77-token text, unified vs class-specific (CSC) context. Each configuration runs in "
        "a fresh subprocess at two smaller class counts; the 1000-class figures are extrapolated linearly (say "
        "--direct to measure 1000 classes for real: tens of minutes and ~20 GB at 77 tokens).",
        epilog="Example: python -m bench.memory --json   (8 subprocesses, a few minutes on 2 cores)",
    )
    p.add_argument("--arch", default=None,
                   help="open_clip architecture or model-config JSON (default ViT-B-16; --quick: a tiny 2-layer CLIP)")
    p.add_argument("--n-cls", type=int, nargs="+", default=None, metavar="N",
                   help="class counts measured (default: 50 100; --quick: 4 8); with --worker, exactly one")
    p.add_argument("--target-n-cls", type=int, default=TARGET_N_CLS, help="class count to report (default 1000)")
    p.add_argument("--direct", action="store_true", help="measure --target-n-cls itself instead of extrapolating")
    p.add_argument("--batch-size", type=int, default=32, help="images (cached features) per step (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny CLIP, 4 and 8 classes, unified context only")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--context", choices=("unified", "csc"), default="unified", help=argparse.SUPPRESS)
    p.add_argument("--text", choices=("truncated", "full"), default="truncated", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.n_cls[0], args.context == "csc", args.text == "truncated",
                                args.arch or "ViT-B-16", args.batch_size)))
        return 0

    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="coop-bench-memory-") as tmp:
        arch = args.arch or (tiny_clip_config(tmp) if args.quick else "ViT-B-16")
        return report(args, arch)


def report(args: argparse.Namespace, arch: str) -> int:
    """Measure the configurations in subprocesses, extrapolate, print."""
    target = args.target_n_cls
    sizes = [target] if args.direct else sorted(args.n_cls or ([4, 8] if args.quick else [50, 100]))
    if not args.direct and len(sizes) < 2:
        raise SystemExit("give at least two --n-cls values to extrapolate from (or --direct)")
    configs = [c for c in CONFIGS if c[1] == "unified"] if args.quick else list(CONFIGS)
    measured: dict[tuple[str, str], list[dict]] = {}
    for text, context in configs:
        measured[(text, context)] = [run_worker(n, context == "csc", text == "truncated", arch,
                                                args.batch_size, args.threads) for n in sizes]
    info = machine()

    arch_name = Path(arch).stem if arch.endswith(".json") else arch
    print(f"Peak memory of one training step (forward, backward, SGD) with the {arch_name} text tower, random "
          f"weights, batch {args.batch_size} of cached image features, ImageNet class names, n_ctx=16, fp32")
    print(machine_line(info))
    print("measured (fresh subprocess per row; baseline = RSS after loading CLIP and building the model):")
    print_table(
        ["text", "context", "classes", "seq (shared)", "baseline MB", "peak MB", "step MB", "saved-for-bwd MB",
         "step s"],
        [[t, c, r["n_cls"], f"{r['seq']} ({r['shared_prefix']})", r["baseline_mb"], r["peak_mb"], r["step_mb"],
          r["saved_for_backward_mb"], r["step_s"]] for (t, c), rows in measured.items() for r in rows],
    )
    results = {}
    for (text, context), rows in measured.items():
        if args.direct:
            r = rows[0]
            results[f"{text}/{context}"] = {k: r[k] for k in ("peak_mb", "step_mb", "saved_for_backward_mb",
                                                               "baseline_mb", "ctx_state_mb", "seq", "shared_prefix")}
        else:
            a, b = rows[0], rows[-1]
            results[f"{text}/{context}"] = {
                "peak_mb": extrapolate(a, b, "peak_mb", target),
                "step_mb": extrapolate(a, b, "step_mb", target),
                "saved_for_backward_mb": extrapolate(a, b, "saved_for_backward_mb", target),
                "baseline_mb": extrapolate(a, b, "baseline_mb", target),
                "ctx_state_mb": extrapolate(a, b, "ctx_state_mb", target),
                "seq": b["seq"],
                "shared_prefix": b["shared_prefix"],
                "activation_mb_per_class": (b["saved_for_backward_mb"] - a["saved_for_backward_mb"])
                / (b["n_cls"] - a["n_cls"]),
            }
    how = "measured directly" if args.direct else f"extrapolated linearly from {sizes[0]} and {sizes[-1]} classes"
    print(f"{target} classes ({how}):")
    print_table(
        ["text", "context", "seq (shared)", "peak MB", "step MB", "saved-for-bwd MB", "context+grad+momentum MB"],
        [[*k.split("/"), f"{v['seq']} ({v['shared_prefix']})", v["peak_mb"], v["step_mb"], v["saved_for_backward_mb"],
          v["ctx_state_mb"]] for k, v in results.items()],
    )
    trunc, full = results["truncated/unified"], results["full/unified"]
    ratio = full["peak_mb"] / trunc["peak_mb"]
    step_ratio = full["step_mb"] / trunc["step_mb"]
    csc_ratio = None
    print(f"full/truncated (unified): peak RSS {ratio:.2f}x, step memory above the loaded model {step_ratio:.2f}x "
          f"(sequence {full['seq']} vs {trunc['seq']})")
    if "truncated/csc" in results:
        csc_ratio = results["truncated/csc"]["peak_mb"] / trunc["peak_mb"]
        print(f"CSC/unified (truncated): peak RSS {csc_ratio:.3f}x; CSC's context + gradient + momentum: "
              f"{results['truncated/csc']['ctx_state_mb']:.1f} MB")
    print(f"What limits it: the activations autograd keeps for backward ({trunc['saved_for_backward_mb']:.0f} MB "
          f"ours, {full['saved_for_backward_mb']:.0f} MB at 77 tokens; every prompt crosses every text layer at every "
          f"step), not the context.")
    if args.quick:
        print("(--quick: tiny class counts, a smoke run; the ratio is not the benchmark's)")
    if args.json:
        emit_json({
            "benchmark": "memory",
            "ratio": ratio,
            "ratio_definition": f"peak RSS of one step, full 77-token text / truncated, unified context, {target} "
            f"classes ({how})",
            "step_memory_ratio": step_ratio,
            "csc_over_unified": csc_ratio,
            "target_n_cls": target,
            "arch": arch_name,
            "results": results,
            "measured": {f"{t}/{c}": rows for (t, c), rows in measured.items()},
            "quick": args.quick,
            "machine": info,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
