"""Class-sharded text and the rule that picks it: the cost-balanced shards, the memory estimate behind both, and two
real gloo processes on EuroSAT images taking exactly the one-process steps, with a unified and a class-specific
context and shards that are not contiguous ranges."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import random
from pathlib import Path
from platform.distributed import TorchDistributed

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from numerics import FORWARD_BACKWARD, ONE_PASS, TRAJECTORY, assert_reordered, assert_reordered_scalar

from coop_core.backbone import load_clip
from coop_core.config import PromptConfig, TrainConfig
from coop_core.datasets import load_dataset
from coop_core.distributed import (
    ClassSharding,
    DataSharding,
    SingleProcess,
    balanced_class_shards,
    choose_text_sharding,
    class_shards,
    gather_class_shards,
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


# --- class shards ---------------------------------------------------------------------------------------------


def _vit_b16_cost(shared: int = 17):
    """Estimated text-step bytes at the ViT-B/16 text tower (width 512, 12 layers), n_ctx 16, unified by default."""
    return lambda n, seq: text_activation_bytes(n, seq, shared, 512, 12)


def _largest(shards, seq_lens, cost) -> int:
    return max(cost(len(s), max(seq_lens[c] for c in s)) for s in shards)


@pytest.mark.parametrize(("n_cls", "world_size"), [(10, 2), (4, 3), (1000, 3), (5, 5), (7, 1), (33, 4)])
def test_balanced_shards_cover_every_class_once_shortest_prompts_first(n_cls, world_size):
    seq_lens = [random.Random(n_cls).randint(18, 30) for _ in range(n_cls)]
    shards = balanced_class_shards(seq_lens, world_size, _vit_b16_cost())
    assert len(shards) == world_size and all(s.dtype == torch.long and len(s) >= 1 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(n_cls))
    assert all(s.tolist() == sorted(s.tolist()) for s in shards)  # ascending within a shard
    longest = [max(seq_lens[c] for c in s.tolist()) for s in shards]
    shortest = [min(seq_lens[c] for c in s.tolist()) for s in shards]
    assert all(a <= b for a, b in zip(longest, shortest[1:]))  # rank r's prompts are no longer than rank r+1's
    again = balanced_class_shards(seq_lens, world_size, _vit_b16_cost())
    assert all(torch.equal(a, b) for a, b in zip(shards, again))  # every worker computes the same split


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("shared", [17, 1], ids=["shared-prefix", "csc"])
def test_balanced_shards_minimise_the_costliest_worker_over_every_possible_split(seed, shared):
    """Against brute force over all assignments of 8 classes to 3 workers (3^8, not only consecutive groups). With a
    shared prefix, 7 of these 10 draws are cases where equal counts of the sorted classes (3 + 3 + 2) cost more."""
    rng = random.Random(seed)
    seq_lens = [rng.choice([18, 19, 20, 21, 24, 30]) for _ in range(8)]
    cost = _vit_b16_cost(shared)
    got = _largest([s.tolist() for s in balanced_class_shards(seq_lens, 3, cost)], seq_lens, cost)
    best = min(
        _largest([[c for c in range(8) if owner[c] == r] for r in range(3)], seq_lens, cost)
        for owner in itertools.product(range(3), repeat=8)
        if len(set(owner)) == 3
    )
    assert got == best


def test_balanced_shards_of_equal_prompts_are_equal_counts():
    shards = balanced_class_shards([77] * 10, 3, lambda n, seq: n * seq)  # not truncated: every prompt costs alike
    assert max(len(s) for s in shards) == 4  # ceil(10 / 3): as few as an even split allows


def test_imagenet_shards_at_vit_b16_balance_the_cost_not_the_count():
    """ImageNet's 1000 names, n_ctx 16: one prompt needs 30 tokens, 754 classes at most 21. Equal contiguous halves
    (what class sharding did first) cost 2.18 GB and 1.63 GB estimated; cut by length both workers cost 1.31 GB."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    placeholder = " ".join(["X"] * 16)
    tokens = tokenizer([f"{placeholder} {name}." for name in open_clip.IMAGENET_CLASSNAMES])
    seq_lens = (tokens.argmax(dim=-1) + 1).tolist()
    cost = _vit_b16_cost()
    shards = [s.tolist() for s in balanced_class_shards(seq_lens, 2, cost)]
    assert [len(s) for s in shards] == [699, 301]
    assert [max(seq_lens[c] for c in s) for s in shards] == [21, 30]
    halves = [list(range(500)), list(range(500, 1000))]
    assert _largest(halves, seq_lens, cost) / 2**30 == pytest.approx(2.18, abs=0.01)
    assert _largest(shards, seq_lens, cost) / 2**30 == pytest.approx(1.316, abs=0.01)


def test_balanced_shards_refuse_fewer_classes_than_workers():
    with pytest.raises(ValueError, match="at least one class per worker.*text_sharding='data'"):
        balanced_class_shards([20, 21], 3, _vit_b16_cost())
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        balanced_class_shards([20, 21], 0, _vit_b16_cost())


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
    assert [s.tolist() for s in forced.shards] == [s.tolist() for s in class_shards(model, 2)]
    assert text_sharding_for("class", model, SingleProcess()).name == "class"
    with pytest.raises(ValueError, match="one class shard per worker, got 1 for 2"):
        ClassSharding(group, class_shards(model, 1))
    with pytest.raises(ValueError, match="at least one class per worker"):
        text_sharding_for("class", model, SingleProcess(rank=0, world_size=5))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
@pytest.mark.parametrize("form", ["ranges", "indices"])
def test_a_class_subset_encodes_exactly_those_rows_of_the_full_text_step(tiny_clip, position, csc, form):
    """A shard's prompts, truncated at the shard's own longest prompt, give the full step's rows and gradients, for a
    range of classes and for an index of scattered classes in any order (the CSC rows of other classes get none)."""
    names = ["sea or lake", "a rather long name for a class of things", "forest", "river", "highway or road"]
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, names,
                      PromptConfig(n_ctx=4, csc=csc, class_token_position=position),
                      generator=torch.Generator().manual_seed(0))
    weights = torch.randn(len(names), model.text_features().shape[1], generator=torch.Generator().manual_seed(1))
    full = model.text_features()  # (5, d)
    (full * weights).sum().backward()
    want_grad = model.prompt_learner.ctx.grad.clone()
    model.prompt_learner.ctx.grad = None
    # The long name is in the first shard only; the indices are out of order and not contiguous.
    shards = (slice(0, 2), slice(2, 5)) if form == "ranges" else (torch.tensor([4, 1]), torch.tensor([0, 3, 2]))
    for i, shard in enumerate(shards):
        part = model.text_features(shard)
        assert_reordered(part, full[shard], ONE_PASS, "a shard's rows vs the full step's")
        (part * weights[shard]).sum().backward()
        if csc and i == 0:  # only the first shard's classes have context gradients yet
            others = torch.ones(len(names), dtype=torch.bool)
            others[shard] = False
            assert torch.count_nonzero(model.prompt_learner.ctx.grad[others]) == 0
            assert torch.count_nonzero(model.prompt_learner.ctx.grad[~others]) > 0
    assert_reordered(model.prompt_learner.ctx.grad, want_grad, FORWARD_BACKWARD, "shards' context gradient vs full")


class _OtherRank:
    """Rank 0 of a 2-worker group whose other worker's gathered rows and feature gradient are given in advance."""

    rank, world_size = 0, 2

    def __init__(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.rows, self.grad = rows, grad

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack([tensor, self.rows])

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        tensor += self.grad


def test_gather_puts_scattered_shards_into_class_order_and_returns_own_rows_of_the_summed_gradient():
    shards = (torch.tensor([1, 3, 4]), torch.tensor([0, 2]))  # rank 0 owns 3 classes, rank 1 two: padded to 3
    features = torch.arange(10.0).reshape(5, 2)  # (n_cls, d), row c = class c's feature
    local = features[shards[0]].clone().requires_grad_()
    other = torch.cat([features[shards[1]], torch.full((1, 2), 99.0)])  # rank 1's rows, padded
    other_grad = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))  # rank 1's images' gradient
    gathered = gather_class_shards(local, shards, _OtherRank(other, other_grad))
    assert torch.equal(gathered, features)  # rows copied into place
    weights = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))  # rank 0's images' gradient
    (gathered * weights).sum().backward()
    assert torch.equal(local.grad, (weights + other_grad)[shards[0]])  # the same one addition per element


def test_class_sharding_of_one_worker_is_the_plain_text_step(tiny_clip):
    model = _text_model(tiny_clip, 5, csc=True)
    got = ClassSharding(SingleProcess(), class_shards(model, 1)).text_features(model)
    got.sum().backward()
    grad = model.prompt_learner.ctx.grad.clone()
    model.prompt_learner.ctx.grad = None
    want = model.text_features()
    want.sum().backward()
    # One shard of every class, in the shard's (prompt-length) order: the same step with its rows permuted.
    assert_reordered(got, want, ONE_PASS, "one worker's class-sharded features vs the plain step")
    assert_reordered(grad, model.prompt_learner.ctx.grad, FORWARD_BACKWARD, "its context gradient")


# --- two gloo processes on real EuroSAT images ------------------------------------------------------------------

WORLD_SIZE = 2
# 2 shots x 10 classes = 20 images; batch 5 -> 4 steps per epoch, image shards of 3 and 2; the classes split 5 + 5 by
# prompt length (tiny CLIP, n_ctx 4): the 5 shortest prompts, which are not a contiguous range, on rank 0.
GLOO_CFG = TrainConfig(shots=2, seed=1, epochs=2, batch_size=5, lr=0.05, warmup_epochs=0, n_views=2)
PROMPTS = {"unified": PromptConfig(n_ctx=4), "csc": PromptConfig(n_ctx=4, csc=True)}


def _gloo_worker(rank: int, init_file: str, backbone: str, classnames: list[str], views: torch.Tensor,
                 labels: torch.Tensor, out_dir: str) -> None:
    """One rank of a class-sharded run; saves its final contexts, histories and the classes it built prompts for."""
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
            encoded: list[torch.Tensor] = []
            model.prompt_learner.register_forward_pre_hook(lambda m, args, seen=encoded: seen.append(args[0]))
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
        shards = class_shards(single, WORLD_SIZE)
        assert [len(s) for s in shards] == [5, 5] and shards[0].tolist() != list(range(5))
        for rank, result in enumerate(ranks):
            got = result[name]
            assert len(got["encoded"]) == 8  # steps
            for classes in got["encoded"]:  # the classes whose prompts it built: its own 5, at every step
                assert torch.equal(classes, shards[rank])
            assert_reordered(got["ctx"], expected, TRAJECTORY, f"{name}, rank {rank}: context vs one process")
            for h_rank, h_single in zip(got["history"], single_history, strict=True):
                assert_reordered_scalar(h_rank["train_loss"], h_single["train_loss"], TRAJECTORY, "epoch loss")
                assert h_rank["train_acc"] == pytest.approx(h_single["train_acc"])
