"""Class-sharded text and the rule that picks it: the shards, the memory estimate behind the rule, and two real gloo
processes on EuroSAT images taking exactly the one-process steps, with a unified and a class-specific context."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from platform.distributed import TorchDistributed

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from coop_core.backbone import load_clip
from coop_core.config import PromptConfig, TrainConfig
from coop_core.datasets import load_dataset
from coop_core.distributed import (
    ClassSharding,
    DataSharding,
    SingleProcess,
    choose_text_sharding,
    class_shard,
    text_activation_bytes,
    text_sharding_for,
)
from coop_core.engine import train
from coop_core.features import CachedViews
from coop_core.fewshot import build_few_shot
from coop_core.model import CoOpModel
from coop_core.pipeline import build_model, prepare_features

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MB = 2**20


# --- class shards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_cls", "world_size"), [(10, 2), (4, 3), (1000, 3), (5, 5), (7, 1)])
def test_class_shards_cover_every_class_once_in_order_with_sizes_within_one(n_cls, world_size):
    shards = [class_shard(n_cls, r, world_size) for r in range(world_size)]
    assert [c for s in shards for c in range(n_cls)[s]] == list(range(n_cls))  # contiguous, in rank order
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True) and min(sizes) >= 1


def test_class_shard_refuses_fewer_classes_than_workers_and_bad_ranks():
    with pytest.raises(ValueError, match="at least one class per worker.*text_sharding='data'"):
        class_shard(2, 0, 3)
    with pytest.raises(ValueError, match="rank must be in"):
        class_shard(10, 2, 2)


def test_single_process_all_gather_stacks_its_one_tensor():
    t = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(SingleProcess().all_gather(t), t[None])


# --- the rule ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "n_cls", "world_size", "text_mb", "model_mb", "expected"),
    [
        ("auto", 1000, 2, 4457, 595, "class"),  # ImageNet at ViT-B/16: the text step is 7x the model
        ("auto", 1000, 1, 4457, 595, "data"),  # one worker: nothing to shard over
        ("auto", 10, 2, 53, 476, "data"),  # EuroSAT at ViT-B/16
        ("auto", 200, 2, 600, 599, "class"),  # just above the line ...
        ("auto", 200, 2, 599, 600, "data"),  # ... and just below
        ("auto", 3, 4, 5000, 100, "data"),  # fewer classes than workers
        ("data", 1000, 2, 4457, 595, "data"),  # forced either way
        ("class", 10, 2, 53, 476, "class"),
        ("class", 7, 1, 1, 100, "class"),  # one worker: trivially the whole shard
    ],
)
def test_choose_text_sharding(requested, n_cls, world_size, text_mb, model_mb, expected):
    got = choose_text_sharding(requested, n_cls=n_cls, world_size=world_size, text_bytes=text_mb * MB,
                               model_bytes=model_mb * MB)
    assert got == expected


def test_choose_text_sharding_refuses_unknown_modes_and_impossible_class_sharding():
    with pytest.raises(ValueError, match=r"one of \('auto', 'data', 'class'\), got 'classes'"):
        choose_text_sharding("classes", n_cls=10, world_size=2, text_bytes=1, model_bytes=1)
    with pytest.raises(ValueError, match="at least one class per worker"):
        choose_text_sharding("class", n_cls=3, world_size=4, text_bytes=1, model_bytes=1)


def test_rule_at_vit_b16_geometry_shards_imagenet_and_not_eurosat():
    """ViT-B/16 text tower (width 512, 12 layers, n_ctx 16): seq 30 for ImageNet's names, 23 for EuroSAT's. The
    CoOp model holds 475 MB of parameters and 0.12 MB of prompt buffers per class (measured once, fixed here)."""

    def choice(n_cls: int, seq: int, csc: bool) -> str:
        text = text_activation_bytes(n_cls, seq, 1 if csc else 17, 512, 12)
        return choose_text_sharding("auto", n_cls=n_cls, world_size=2, text_bytes=text,
                                    model_bytes=int((475 + 0.12 * n_cls) * MB))

    assert [choice(1000, 30, csc) for csc in (False, True)] == ["class", "class"]
    assert [choice(10, 23, csc) for csc in (False, True)] == ["data", "data"]
    assert [choice(100, 30, csc) for csc in (False, True)] == ["data", "class"]  # CSC shares no prefix: more rows


def _text_model(clip, n_cls: int, csc: bool) -> CoOpModel:
    names = [f"class {i} of a fairly long name" if i % 3 == 0 else f"class {i}" for i in range(n_cls)]
    return CoOpModel(clip.model, clip.tokenizer, names, PromptConfig(n_ctx=4, csc=csc),
                     generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
def test_text_activation_estimate_matches_what_autograd_keeps(tiny_clip, csc):
    """The rule's estimate against the bytes autograd actually saves in a text step (model weights excluded)."""
    model = _text_model(tiny_clip, 12, csc)
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.text_features()
    pl, transformer = model.prompt_learner, model.text_encoder.transformer
    estimate = text_activation_bytes(pl.n_cls, int(pl.eot_idx.max()) + 1, model.shared_prefix, transformer.width,
                                     transformer.layers)
    assert estimate == pytest.approx(sum(saved.values()), rel=0.05)


def test_text_sharding_for_a_model(tiny_clip):
    model = _text_model(tiny_clip, 4, csc=False)
    group = SingleProcess(rank=0, world_size=2)  # only its rank and size are read
    assert isinstance(text_sharding_for("auto", model, group), DataSharding)  # tiny text step, large embedding
    forced = text_sharding_for("class", model, group)
    assert isinstance(forced, ClassSharding) and forced.dist is group and forced.name == "class"
    assert text_sharding_for("class", model, SingleProcess()).name == "class"
    with pytest.raises(ValueError, match="at least one class per worker"):
        text_sharding_for("class", model, SingleProcess(rank=0, world_size=5))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
def test_a_class_range_encodes_exactly_those_rows_of_the_full_text_step(tiny_clip, position, csc):
    """A shard's prompts, truncated at the shard's own longest prompt, give the full step's rows and gradients."""
    names = ["sea or lake", "a rather long name for a class of things", "forest", "river", "highway or road"]
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, names,
                      PromptConfig(n_ctx=4, csc=csc, class_token_position=position),
                      generator=torch.Generator().manual_seed(0))
    weights = torch.randn(len(names), model.text_features().shape[1], generator=torch.Generator().manual_seed(1))
    full = model.text_features()  # (5, d)
    (full * weights).sum().backward()
    want_grad = model.prompt_learner.ctx.grad.clone()
    model.prompt_learner.ctx.grad = None
    for shard in (slice(0, 2), slice(2, 5)):  # the long name is in the first shard only
        part = model.text_features(shard)
        torch.testing.assert_close(part, full[shard].detach())
        (part * weights[shard]).sum().backward()
    torch.testing.assert_close(model.prompt_learner.ctx.grad, want_grad, rtol=1e-5, atol=1e-5)  # summation order


def test_class_sharding_of_one_worker_is_the_plain_text_step(tiny_clip):
    model = _text_model(tiny_clip, 5, csc=True)
    got = ClassSharding(SingleProcess()).text_features(model)
    got.sum().backward()
    grad = model.prompt_learner.ctx.grad.clone()
    model.prompt_learner.ctx.grad = None
    want = model.text_features()
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, model.prompt_learner.ctx.grad)


# --- two gloo processes on real EuroSAT images ------------------------------------------------------------------

WORLD_SIZE = 2
# 2 shots x 10 classes = 20 images; batch 5 -> 4 steps per epoch, image shards of 3 and 2; the classes split 5 + 5.
GLOO_CFG = TrainConfig(shots=2, seed=1, epochs=2, batch_size=5, lr=0.05, warmup_epochs=0, n_views=2)
PROMPTS = {"unified": PromptConfig(n_ctx=4), "csc": PromptConfig(n_ctx=4, csc=True)}


def _gloo_worker(rank: int, init_file: str, backbone: str, classnames: list[str], views: torch.Tensor,
                 labels: torch.Tensor, out_dir: str) -> None:
    """One rank of a class-sharded run; saves its final contexts, histories and text-encoder batch sizes."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                                  timeout=datetime.timedelta(seconds=120))
    try:
        dist = TorchDistributed(rank=rank, world_size=WORLD_SIZE)
        clip = load_clip(backbone, "none")
        cfg = dataclasses.replace(GLOO_CFG, text_sharding="class")
        results = {}
        for name, prompt in PROMPTS.items():
            model = build_model(clip, classnames, prompt, cfg.seed)
            encoded: list[int] = []
            model.text_encoder.register_forward_pre_hook(lambda m, args, seen=encoded: seen.append(args[0].shape[0]))
            history = train(model, CachedViews(views, labels, seed=cfg.seed), cfg, dist=dist)
            results[name] = {"ctx": model.prompt_learner.ctx.detach().clone(), "history": history, "encoded": encoded}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def eurosat_views(shared_data, tiny_vit_config, tmp_path_factory):
    """Cached training views of 20 real EuroSAT images (2 shots per class) from the tiny CLIP."""
    tmp = tmp_path_factory.mktemp("eurosat-views")
    splits = load_dataset("eurosat", shared_data)
    fewshot = build_few_shot(splits, GLOO_CFG.shots, seed=GLOO_CFG.seed, cache_dir=tmp)
    feats = prepare_features(load_clip(tiny_vit_config, "none"), splits, fewshot, GLOO_CFG, cache_dir=tmp,
                             with_test=False)
    return list(splits.classnames), feats.train.views, feats.train.labels


def test_two_gloo_workers_class_sharded_take_the_one_process_steps(eurosat_views, tiny_clip, tiny_vit_config,
                                                                    tmp_path):
    classnames, views, labels = eurosat_views
    assert views.shape[:2] == (GLOO_CFG.n_views, 20)
    mp.spawn(_gloo_worker, args=(str(tmp_path / "store"), tiny_vit_config, classnames, views, labels, str(tmp_path)),
             nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    for name, prompt in PROMPTS.items():
        single = build_model(tiny_clip, classnames, prompt, GLOO_CFG.seed)
        start = single.prompt_learner.ctx.detach().clone()
        single_history = train(single, CachedViews(views, labels, seed=GLOO_CFG.seed), GLOO_CFG)
        expected = single.prompt_learner.ctx.detach()
        assert (expected - start).abs().max() > 1e-3  # training moved the context
        for rank, result in enumerate(ranks):
            got = result[name]
            assert got["encoded"] == [5] * 8, got["encoded"]  # its 5 of the 10 classes, at each of the 8 steps
            torch.testing.assert_close(got["ctx"], expected, atol=1e-5, rtol=0, msg=f"{name}, rank {rank}")
            for h_rank, h_single in zip(got["history"], single_history, strict=True):
                assert h_rank["train_loss"] == pytest.approx(h_single["train_loss"], rel=1e-5)
                assert h_rank["train_acc"] == pytest.approx(h_single["train_acc"])
