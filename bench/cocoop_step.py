"""CoCoOp's training cost per image: the reference's compute versus ours, side by side on this machine.

Reference (``trainers/cocoop.py``, ``vit_b16_c4_ep10_batch1_ctxv1.yaml``): one image per step; the frozen image encoder
runs on it (224 px, fp32), the meta-net shifts the context, and CLIP's text transformer runs over all 77 positions
of that image's ``n_cls`` prompts, backward through both, then an SGD step. Its cost is per image.
Ours (``coop_core.model.CoCoOpModel``): the image feature comes from the feature cache, a batch of images' prompts goes
through the text encoder together, truncated at the longest end-of-text token. Cost per image = step time / batch.

Both start from the same context and meta-net, so the logits of the same image must agree (reported).
Random weights (``pretrained="none"``): speed does not depend on weight values.

    .venv/bin/python -m bench.cocoop_step              # ViT-B-16, EuroSAT's 10 classes, our batch 32
    .venv/bin/python -m bench.cocoop_step --quick      # a smoke run in seconds (tiny model)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import EUROSAT_CLASSNAMES, emit_json, interleaved, machine, machine_line, set_threads  # noqa: E402
from coop_core.backbone import load_clip  # noqa: E402
from coop_core.config import PromptConfig  # noqa: E402
from coop_core.model import CoCoOpModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def reference_logits(model: CoCoOpModel, image: torch.Tensor) -> torch.Tensor:
    """The reference's forward for one image: encoder, meta-net, its n_cls prompts over all 77 positions."""
    feats = F.normalize(model.image_encoder(image).float(), dim=-1)  # (1, d)
    pl = model.prompt_learner
    ctx = pl.ctx.unsqueeze(0) + model.meta_net(feats).unsqueeze(1)  # (1, n_ctx, width)
    prompts = torch.cat([pl.token_prefix, ctx.expand(pl.n_cls, -1, -1), pl.token_suffix], dim=1)  # (n_cls, 77, w)
    tower = model.text_encoder
    x = prompts + tower.positional_embedding
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)[torch.arange(pl.n_cls), pl.eot_idx] @ tower.text_projection  # (n_cls, d)
    return model.logit_scale.exp() * feats @ F.normalize(x, dim=-1).t()  # (1, n_cls)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16", help="open_clip architecture or model-config JSON (default ViT-B-16)")
    p.add_argument("--batch-size", type=int, default=32, help="our images per step (default 32)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds, interleaved (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: the tests' tiny ViT, 2 rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.reps = str(REPO / "tests" / "fixtures" / "tiny-vit.json"), 2
    set_threads(args.threads)
    clip = load_clip(args.arch, "none")
    prompt = PromptConfig(n_ctx=4, ctx_init="a photo of a")
    model = CoCoOpModel(clip.model, clip.tokenizer, EUROSAT_CLASSNAMES, prompt,
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    size = clip.image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=g)
    labels = torch.randint(len(EUROSAT_CLASSNAMES), (args.batch_size,), generator=g)
    with torch.no_grad():
        cached = F.normalize(model.image_encoder(images).float(), dim=-1)  # the feature cache's entries
        diff = float((reference_logits(model, images[:1]) - model.forward_features(cached[:1])).abs().max())
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-9, momentum=0.9)  # tiny lr: the weights stay put
    state = {"i": 0}

    def reference_step() -> None:  # one image, as the reference trains
        i = state["i"] % args.batch_size
        state["i"] += 1
        opt.zero_grad()
        F.cross_entropy(reference_logits(model, images[i:i + 1]), labels[i:i + 1]).backward()
        opt.step()

    def our_step() -> None:  # a batch of cached features
        opt.zero_grad()
        F.cross_entropy(model.forward_features(cached), labels).backward()
        opt.step()

    timings = interleaved({"reference": reference_step, "ours": our_step}, reps=args.reps, warmup=1)
    ref_per_image = timings["reference"].median
    ours_per_image = timings["ours"].median / args.batch_size
    ratio = ref_per_image / ours_per_image
    print(machine_line(machine()))
    print(f"CoCoOp training cost per image, {Path(args.arch).stem}, {len(EUROSAT_CLASSNAMES)} classes, 4 context "
          f"tokens; reference: one image per step (encoder + 77-position text); ours: {args.batch_size} cached "
          f"features per step (truncated text); medians of {args.reps} interleaved rounds")
    print(f"  reference  {1e3 * ref_per_image:9.2f} ms/image")
    print(f"  ours       {1e3 * ours_per_image:9.2f} ms/image ({1e3 * timings['ours'].median:.1f} ms per step)")
    print(f"  ratio      {ratio:9.1f}x   (max |logit difference| of one image: {diff:.2e})")
    if args.json:
        emit_json({"arch": args.arch, "batch": args.batch_size, "reference_ms_per_image": 1e3 * ref_per_image,
                   "ours_ms_per_image": 1e3 * ours_per_image, "max_abs_logit_diff": diff, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
