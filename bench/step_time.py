"""One CoOp training step: the reference compute versus ours, side by side on this machine.

Reference (CoOp/Dassl): every step runs the frozen image encoder on the batch (224 px, fp32) and CLIP's text
transformer over all 77 positions, backpropagates through the text path and takes an SGD step on the context.
Ours: the batch's image features come from the feature cache (a tensor lookup in ``CachedViews``) and the text
transformer runs only up to the longest end-of-text position, with the positions all prompts share (start token +
unified context) computed once (``CoOpModel(truncate_text=True)``).

Both steps start from the same context and the same images, so the logits must agree: the reference logits (encode the
images, full 77-token text) are compared with ours (cached features of the same images, truncated text).

Random weights (``pretrained="none"``): speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

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
from coop_core.config import PromptConfig, TrainConfig  # noqa: E402
from coop_core.engine import make_optimizer  # noqa: E402
from coop_core.features import CachedViews, extract_features  # noqa: E402
from coop_core.model import CoOpModel  # noqa: E402

TARGET_SPEEDUP = 25.0
TARGET_MAX_ABS_DIFF = 1e-4


def bench_arch(arch: str, batch: int, reps: int, warmup: int, ours_per_round: int, seed: int) -> dict:
    """Measure one architecture; returns its result row."""
    clip = load_clip(arch, "none")
    prompt = PromptConfig()  # CoOp's default: n_ctx=16, random init, unified context, class token at the end
    cfg = TrainConfig()

    def coop() -> CoOpModel:
        return CoOpModel(clip.model, clip.tokenizer, EUROSAT_CLASSNAMES, prompt, truncate_text=True,
                         generator=torch.Generator().manual_seed(seed))

    ref, ours = coop(), coop()  # same context; the reference never calls ours' (truncating) text encoder
    g = torch.Generator().manual_seed(seed)
    size = clip.image_size
    images = torch.randn(batch, 3, size, size, generator=g)  # (b, 3, H, W), already "preprocessed"
    labels = torch.randint(len(EUROSAT_CLASSNAMES), (batch,), generator=g)
    feats, _ = extract_features(clip.model.visual, TensorDataset(images, labels), batch_size=max(batch, 64))
    source = CachedViews(feats.unsqueeze(0), labels, seed=seed)  # one cached view: (1, b, d)
    index = torch.arange(batch)

    with torch.no_grad():
        ref_logits = ref.logits(ref.encode_images(images), reference_text_features(ref))
        our_logits = ours.forward_features(source.batch(index, 0))
    max_abs_diff = float((ref_logits - our_logits).abs().max())
    seq_ours = int(ours.prompt_learner.eot_idx.max()) + 1
    shared = ours.shared_prefix
    seq_ref = ours.prompt_learner.tokenized_prompts.shape[1]

    ref_opt, _ = make_optimizer(ref, cfg)
    our_opt, _ = make_optimizer(ours, cfg)
    parts: dict[str, list[float]] = {"image": [], "text": []}

    def ref_step() -> None:
        ref_opt.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        image_features = ref.encode_images(images)  # (b, d), frozen encoder every step
        t1 = time.perf_counter()
        logits = ref.logits(image_features, reference_text_features(ref))  # (b, n_cls), 77 positions
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        ref_opt.step()
        parts["image"].append(t1 - t0)
        parts["text"].append(time.perf_counter() - t1)

    def our_step() -> None:
        our_opt.zero_grad(set_to_none=False)
        logits = ours.forward_features(source.batch(index, 0))  # (b, n_cls), cached features, truncated text
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        our_opt.step()

    timings = interleaved({"reference": ref_step, "ours": our_step}, reps=reps, warmup=warmup,
                          inner={"ours": ours_per_round})
    image_t = statistics.median(parts["image"][warmup:])  # the warm-up rounds come first
    text_t = statistics.median(parts["text"][warmup:])
    ref_t, our_t = timings["reference"], timings["ours"]
    return {
        "arch": arch,
        "batch": batch,
        "seq_reference": seq_ref,
        "seq_ours": seq_ours,
        "shared_prefix_ours": shared,
        "reference_step_s": ref_t.median,
        "reference_step_min_s": ref_t.min,
        "reference_image_encoder_s": image_t,
        "reference_text_s": text_t,
        "ours_step_s": our_t.median,
        "ours_step_min_s": our_t.min,
        "reference_reps": len(ref_t.times),
        "ours_reps": len(our_t.times),
        "speedup": ref_t.median / our_t.median,
        "speedup_min": ref_t.min / our_t.min,
        "speedup_paired": paired_ratio(ref_t, our_t, 1, ours_per_round),
        "max_abs_logit_diff": max_abs_diff,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.step_time",
        description="Time one CoOp training step, reference compute (image encoder on the batch + 77-token text "
        "encoder) versus ours (cached image features + truncated text encoder), on EuroSAT's 10 class names with "
        "random CLIP weights, and check that both give the same logits.",
        epilog="Example: python -m bench.step_time --json   (ViT-B-16 and RN50, batch 32: a few minutes on 2 cores)",
    )
    p.add_argument("--archs", nargs="+", default=None, metavar="ARCH",
                   help="open_clip architectures or model-config JSON paths (default: ViT-B-16 RN50; "
                   "--quick: ViT-B-16)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 32; --quick: 4)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed reference steps per architecture; the reference image encoder takes ~10 s per batch "
                   "of 32 at ViT-B/16 on 2 cores, so few (default 3; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; --quick: 0)")
    p.add_argument("--ours-per-round", type=int, default=5,
                   help="our (cheap) steps timed per reference step, interleaved (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the context, images and labels")
    p.add_argument("--quick", action="store_true", help="CI smoke run in seconds: ViT-B-16 only, batch 4, one rep")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    archs = args.archs or (["ViT-B-16"] if args.quick else ["ViT-B-16", "RN50"])
    batch = args.batch_size or (4 if args.quick else 32)
    reps = args.reps or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = [bench_arch(a, batch, reps, warmup, args.ours_per_round, args.seed) for a in archs]
    info = machine()

    print("speedup = median reference step / median of ours; paired = median over rounds of (reference step / our "
          "steps of the same round), robust to load from other processes; min/min = best / best")
    print(f"One training step, EuroSAT 10 classes, n_ctx=16 (class token at the end), batch {batch}, fp32, "
          f"random weights; median of {reps} reference steps and {reps * args.ours_per_round} of ours, "
          f"interleaved, after {warmup} warm-up round(s)")
    print(machine_line(info))
    print_table(
        ["arch", "ref step s", "  image enc s", "  text+bwd+SGD s", "ours step s", "text positions", "speedup",
         "paired", "min/min", "max|dlogit|"],
        [[r["arch"], r["reference_step_s"], r["reference_image_encoder_s"], r["reference_text_s"], r["ours_step_s"],
          f"{r['seq_ours']} ({r['shared_prefix_ours']} shared)/{r['seq_reference']}", f"{r['speedup']:.1f}x",
          f"{r['speedup_paired']:.1f}x", f"{r['speedup_min']:.1f}x", f"{r['max_abs_logit_diff']:.1e}"]
         for r in rows],
    )
    main_row = rows[0]
    for r in rows:
        ok_speed = r["speedup"] >= TARGET_SPEEDUP
        ok_diff = r["max_abs_logit_diff"] <= TARGET_MAX_ABS_DIFF
        print(f"{r['arch']}: speedup {r['speedup']:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: "
              f"{'met' if ok_speed else 'NOT met'}), max |logit diff| {r['max_abs_logit_diff']:.1e} "
              f"(target <= {TARGET_MAX_ABS_DIFF:.0e}: {'met' if ok_diff else 'NOT met'})")
    if args.quick:
        print("(--quick: smaller batch and one repetition, a smoke run; the ratio is not the benchmark's)")
    if args.json:
        emit_json({
            "benchmark": "step_time",
            "ratio": main_row["speedup"],
            "ratio_definition": f"reference step time / our step time (median), {main_row['arch']}",
            "ratios": {r["arch"]: r["speedup"] for r in rows},
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
            "target_speedup": TARGET_SPEEDUP,
            "target_max_abs_diff": TARGET_MAX_ABS_DIFF,
            "quick": args.quick,
            "rows": rows,
            "machine": info,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
