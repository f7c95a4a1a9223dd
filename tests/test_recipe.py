"""CoOp's recipe, item by item, against the reference: CoOp's ``trainers/coop.py`` and ``configs/trainers/CoOp/*.yaml``
run on Dassl.pytorch's defaults (``dassl/config/defaults.py``, ``optim/``, ``data/``, ``engine/trainer.py``).

Expected values come from the reference's definitions, never from our own functions: the learning-rate schedule is
re-enacted with torch's own ``CosineAnnealingLR`` stepped the way Dassl's ``ConstantWarmupScheduler`` steps it, and
pinned to constants printed by Dassl's scheduler itself; the SGD update is written out by hand; batching, shuffling
and transforms are rebuilt from the torch/torchvision pieces Dassl assembles them from.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_reordered
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from coop_core import engine, transforms
from coop_core.config import PromptConfig, TrainConfig
from coop_core.datasets import DatasetSplits, Item
from coop_core.engine import TrainState, global_batches, lr_at, make_optimizer, train
from coop_core.features import CachedViews, FeatureSet
from coop_core.fewshot import build_few_shot
from coop_core.model import CoOpModel

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["annual_crop_land", "forest", "highway", "sea_or_lake"]
D = 32  # the tiny CLIP's embedding width

# CoOp's configs/trainers/CoOp/*.yaml (OPTIM, DATALOADER.TRAIN_X) and Dassl's defaults they leave in place.
REF_LR, REF_WARMUP_EPOCHS, REF_WARMUP_LR = 0.002, 1, 1e-5
REF_MOMENTUM, REF_DAMPENING, REF_NESTEROV, REF_WEIGHT_DECAY = 0.9, 0.0, False, 5e-4
REF_BATCH = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # configs/trainers/CoOp/*.yaml INPUT.PIXEL_MEAN / PIXEL_STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Printed by Dassl's own build_lr_scheduler (cosine, constant warm-up 1 epoch at 1e-5, WARMUP_RECOUNT=True) around
# SGD(lr=0.002), stepped once per epoch: {max_epoch: {0-based epoch: lr during that epoch}}.
DASSL_PRINTED = {
    50: {0: 1e-05, 1: 0.002, 2: 0.00199803, 48: 1.77127e-05, 49: 7.8853e-06},
    100: {0: 1e-05, 1: 0.002, 2: 0.00199951, 98: 4.43804e-06, 99: 1.97327e-06},
    200: {0: 1e-05, 1: 0.002, 2: 0.00199988, 198: 1.11013e-06, 199: 4.9344e-07},
}


def dassl_schedule(epochs: int, warmup_epochs: int, lr: float, warmup_lr: float) -> list[float]:
    """Each epoch's lr under CoOp's scheduler, re-enacted with torch's ``CosineAnnealingLR``.

    Dassl builds ``CosineAnnealingLR(T_max=epochs)`` first (which leaves the base rate in the optimiser) and, with a
    warm-up, wraps it in ``ConstantWarmupScheduler``, whose constructor sets the warm-up rate. At each epoch's end the
    wrapper's ``step`` either counts a warm-up epoch (and keeps the constant rate), or, on the step that ends the
    warm-up, hands the optimiser the cosine's last rate (the base rate: with ``WARMUP_RECOUNT=True`` the cosine has
    not been stepped yet), or afterwards steps the cosine.
    """
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=float(epochs))
    group = opt.param_groups[0]
    if warmup_epochs > 0:
        group["lr"] = warmup_lr
    lrs = []
    for epoch in range(epochs):
        lrs.append(group["lr"])
        opt.step()  # no gradient: a no-op that keeps torch's "scheduler before optimizer" check quiet
        ended = epoch + 1
        if ended == warmup_epochs:
            group["lr"] = cosine.get_last_lr()[0]
        elif ended > warmup_epochs:
            cosine.step()
    return lrs


def _model(clip, seed: int = 0) -> CoOpModel:
    return CoOpModel(clip.model, clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4),
                     generator=torch.Generator().manual_seed(seed))


def _views(n: int, seed: int = 0) -> CachedViews:
    g = torch.Generator().manual_seed(seed)
    return CachedViews(F.normalize(torch.randn(2, n, D, generator=g), dim=-1),
                       torch.randint(len(CLASSNAMES), (n,), generator=g))


class RecordingSource:
    """A training source that records every step: its epoch, its items, and the lr the optimiser steps it with."""

    def __init__(self, inner: CachedViews, optimizers: list[torch.optim.Optimizer]) -> None:
        self.inner = inner
        self.labels = inner.labels
        self.optimizers = optimizers
        self.steps: list[tuple[int, list[int], float]] = []

    def batch(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        self.steps.append((epoch, indices.tolist(), self.optimizers[-1].param_groups[0]["lr"]))
        return self.inner.batch(indices, epoch)

    def epochs(self) -> dict[int, list[tuple[list[int], float]]]:
        out: dict[int, list[tuple[list[int], float]]] = {}
        for epoch, items, lr in self.steps:
            out.setdefault(epoch, []).append((items, lr))
        return out


@pytest.fixture
def optimizers(monkeypatch) -> list[torch.optim.Optimizer]:
    """The optimisers ``train`` builds, captured so a test can read the lr each step uses."""
    made: list[torch.optim.Optimizer] = []
    real = engine.make_optimizer

    def capture(model, cfg):
        opt, sched = real(model, cfg)
        made.append(opt)
        return opt, sched

    monkeypatch.setattr(engine, "make_optimizer", capture)
    return made


# --- learning-rate schedule -------------------------------------------------------------------------------------


def test_reenactment_reproduces_the_values_dassl_prints():
    for epochs, printed in DASSL_PRINTED.items():
        ref = dassl_schedule(epochs, REF_WARMUP_EPOCHS, REF_LR, REF_WARMUP_LR)
        assert {e: ref[e] for e in printed} == pytest.approx(printed, rel=1e-5)


@pytest.mark.parametrize("epochs", [50, 100, 200])
def test_schedule_is_dassls_for_coops_epoch_counts(epochs):
    cfg = TrainConfig(epochs=epochs)
    ours = [lr_at(e, cfg) for e in range(epochs)]
    assert ours == pytest.approx(dassl_schedule(epochs, REF_WARMUP_EPOCHS, REF_LR, REF_WARMUP_LR), rel=1e-12, abs=0)
    assert {e: ours[e] for e in DASSL_PRINTED[epochs]} == pytest.approx(DASSL_PRINTED[epochs], rel=1e-5)
    assert ours[0] == REF_WARMUP_LR
    assert ours[1] == REF_LR  # the first epoch after the warm-up runs at the full base rate


@pytest.mark.parametrize(("epochs", "warmup_epochs"), [(50, 0), (50, 2), (100, 5), (10, 9), (4, 6)])
def test_schedule_is_dassls_for_other_warmup_lengths(epochs, warmup_epochs):
    """With ``WARMUP_RECOUNT`` the cosine starts at the base rate the epoch the warm-up ends, however long it was;
    without a warm-up it is the plain cosine, and a warm-up as long as the run keeps the constant rate throughout."""
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup_epochs, lr=0.01, warmup_lr=3e-4)
    ours = [lr_at(e, cfg) for e in range(epochs)]
    assert ours == pytest.approx(dassl_schedule(epochs, warmup_epochs, 0.01, 3e-4), rel=1e-12, abs=0)
    if warmup_epochs < epochs:
        assert ours[warmup_epochs] == 0.01


@pytest.mark.parametrize(("shots", "epochs"), [(1, 50), (2, 100), (8, 200)])
def test_training_steps_with_dassls_lr_once_per_epoch(tiny_clip, optimizers, shots, epochs):
    """Epochs by shots (COOP.md: 1 shot ``*_ep50``, 2/4 shots ``*_ep100``, 8/16 shots the 200-epoch config), and every
    step of epoch ``e`` uses the reference's lr for ``e``: the scheduler moves once per epoch, after its last batch
    (CoOp's ``forward_backward`` calls ``update_lr`` when ``batch_idx + 1 == num_batches``)."""
    source = RecordingSource(_views(10), optimizers)
    history = train(_model(tiny_clip), source, TrainConfig(shots=shots, batch_size=4))  # 2 steps per epoch
    ref = dassl_schedule(epochs, REF_WARMUP_EPOCHS, REF_LR, REF_WARMUP_LR)
    per_epoch = source.epochs()
    assert sorted(per_epoch) == list(range(epochs))
    assert all(len(steps) == 2 for steps in per_epoch.values())
    step_lrs = [[lr for _, lr in per_epoch[e]] for e in range(epochs)]
    assert step_lrs == [pytest.approx([r, r], rel=1e-12, abs=0) for r in ref]
    assert [h["lr"] for h in history] == pytest.approx(ref, rel=1e-12, abs=0)
    assert history[1]["lr"] == pytest.approx(REF_LR, rel=1e-12)


@pytest.mark.parametrize("resume_at", [1, 2, 3, 5])
def test_resume_continues_the_schedule_exactly(tiny_clip, resume_at):
    """Resuming inside the warm-up, at its end, or in the cosine gives the straight run's lrs and context."""
    cfg = TrainConfig(epochs=6, warmup_epochs=2, batch_size=4, lr=0.05, warmup_lr=1e-3)
    data = _views(10)
    straight = _model(tiny_clip)
    states: dict[int, TrainState] = {}
    straight_history = train(straight, data, cfg, on_epoch_end=lambda s, m: states.__setitem__(s.epoch, s))
    assert [h["lr"] for h in straight_history] == pytest.approx(dassl_schedule(6, 2, 0.05, 1e-3), rel=1e-12, abs=0)

    resumed = _model(tiny_clip)
    resumed_history = train(resumed, data, cfg, resume=states[resume_at])
    assert [h["lr"] for h in resumed_history] == [h["lr"] for h in straight_history[resume_at:]]
    assert [h["train_loss"] for h in resumed_history] == [h["train_loss"] for h in straight_history[resume_at:]]
    assert torch.equal(resumed.prompt_learner.ctx, straight.prompt_learner.ctx)


# --- optimiser --------------------------------------------------------------------------------------------------


def test_optimizer_is_dassls_sgd_over_the_context_only(tiny_clip):
    """Dassl's ``build_optimizer`` with CoOp's ``OPTIM.NAME sgd``: SGD(momentum 0.9, dampening 0, no Nesterov,
    weight decay 5e-4) over ``prompt_learner`` only, whose one parameter is the context."""
    model = _model(tiny_clip)
    opt, _ = make_optimizer(model, TrainConfig())
    assert type(opt) is torch.optim.SGD
    (group,) = opt.param_groups
    assert len(group["params"]) == 1 and group["params"][0] is model.prompt_learner.ctx
    assert (group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"], group["maximize"]) == (
        REF_MOMENTUM, REF_DAMPENING, REF_NESTEROV, REF_WEIGHT_DECAY, False)
    assert group["initial_lr"] == REF_LR


def test_sgd_steps_are_heavy_ball_momentum_with_coupled_weight_decay(tiny_clip):
    """Two steps written out by hand: d = g + wd * p; buf = d, then buf = m * buf + d; p -= lr * buf.

    Nesterov (p -= lr * (d + m * buf)), dampening (buf = m * buf + (1 - dampening) * d) or decoupled weight decay
    would each give a different second step.
    """
    model = _model(tiny_clip)
    cfg = TrainConfig(lr=0.1, warmup_epochs=0)  # a large rate, so the terms are far above rounding
    opt, _ = make_optimizer(model, cfg)
    ctx = model.prompt_learner.ctx
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(ctx.shape, generator=g) for _ in range(2)]
    p = ctx.detach().clone()
    buf = None
    for grad in grads:
        ctx.grad = grad.clone()
        opt.step()
        d = grad + REF_WEIGHT_DECAY * p
        buf = d if buf is None else REF_MOMENTUM * buf + d
        p = p - 0.1 * buf
        # Elementwise p - lr * buf: the optimiser may fuse the multiply-add (one rounding less), nothing is summed.
        assert_reordered(ctx, p, 4, "SGD step vs the update written out")


# --- data: batches, shuffling, few-shot validation --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 63, 64, 65, 160])
def test_batches_are_dassls_train_loader(n):
    """Dassl's ``build_data_loader``: batch 32 over a ``RandomSampler``, ``drop_last=len(data) >= batch_size``."""
    assert TrainConfig().batch_size == REF_BATCH
    sampler = torch.utils.data.RandomSampler(range(n))
    loader = torch.utils.data.DataLoader(range(n), batch_size=REF_BATCH, sampler=sampler, drop_last=n >= REF_BATCH)
    expected_sizes = [len(b) for b in loader]
    batches = global_batches(n, REF_BATCH, seed=1, epoch=0)
    assert [len(b) for b in batches] == expected_sizes
    flat = torch.cat(batches).tolist()
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))


def test_every_epoch_is_a_fresh_shuffle(tiny_clip, optimizers):
    """Dassl's ``RandomSampler`` draws a new permutation each epoch, so the dropped partial batch differs too."""
    source = RecordingSource(_views(10), optimizers)
    train(_model(tiny_clip), source, TrainConfig(epochs=8, batch_size=4))
    orders = [sum((items for items, _ in steps), []) for _, steps in sorted(source.epochs().items())]
    assert all(len(order) == 8 and len(set(order)) == 8 for order in orders)  # 2 full batches, the partial 2 dropped
    assert len({tuple(order) for order in orders}) == len(orders)
    assert set().union(*map(set, orders)) == set(range(10))  # no item is always left out


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_validation_set_has_min_of_shots_and_4_per_class(shots, tmp_path):
    """CoOp's ``datasets/*.py``: ``generate_fewshot_dataset(val, num_shots=min(num_shots, 4))``."""
    def items(split: str) -> tuple[Item, ...]:
        return tuple(Item(f"c{c}/{split}_{i}.jpg", c, f"class {c}") for c in range(3) for i in range(20))

    splits = DatasetSplits(name="toy", image_dir=tmp_path, classnames=("class 0", "class 1", "class 2"),
                           template="a photo of a {}.", train=items("train"), val=items("val"), test=items("test"))
    fs = build_few_shot(splits, shots, seed=1, cache_dir=None)
    assert [sum(it.label == c for it in fs.train) for c in range(3)] == [shots] * 3
    assert [sum(it.label == c for it in fs.val) for c in range(3)] == [min(shots, 4)] * 3


# --- transforms -------------------------------------------------------------------------------------------------


def _image() -> Image.Image:
    rng = random.Random(0)
    w, h = 61, 47  # not square: the resize and the crops have work to do
    return Image.frombytes("RGB", (w, h), bytes(rng.randrange(256) for _ in range(w * h * 3)))


def test_train_transform_is_dassls_random_resized_crop_and_flip():
    """Dassl's ``_build_transform_train`` for CoOp's ``INPUT.TRANSFORMS``: RandomResizedCrop(INPUT.SIZE,
    scale=RRCROP_SCALE (0.08, 1), bicubic) + RandomHorizontalFlip + ToTensor + Normalize; same draws, same pixels."""
    size = 24
    ref = T.Compose([
        T.RandomResizedCrop((size, size), scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    ours = transforms.train_transform(size, CLIP_MEAN, CLIP_STD)
    image = _image()
    outputs = set()
    for seed in range(12):
        torch.manual_seed(seed)
        want = ref(image)
        torch.manual_seed(seed)
        got = ours(image)
        assert torch.equal(got, want), seed
        outputs.add(want.sum().item())
    assert len(outputs) == 12  # the draws differ from seed to seed: the comparison covered many crops


def test_test_transform_is_dassls_resize_and_centre_crop():
    """Dassl's ``_build_transform_test``: Resize(max(INPUT.SIZE), bicubic) of the short side + CenterCrop(INPUT.SIZE)
    + ToTensor + Normalize."""
    size = 24
    ref = T.Compose([
        T.Resize(max((size, size)), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop((size, size)),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    assert torch.equal(transforms.test_transform(size, CLIP_MEAN, CLIP_STD)(_image()), ref(_image()))


# --- final model ------------------------------------------------------------------------------------------------


def test_final_model_is_the_last_epochs_not_the_best_validated(tiny_clip):
    """Dassl's ``TEST.FINAL_MODEL = "last_step"`` (CoOp keeps it): the model after training is the last epoch's, even
    when an earlier epoch validated better."""
    g = torch.Generator().manual_seed(5)
    val = FeatureSet(F.normalize(torch.randn(24, D, generator=g), dim=-1), torch.randint(4, (24,), generator=g))
    model = _model(tiny_clip)
    states: list[TrainState] = []
    history = train(model, _views(12), TrainConfig(epochs=8, batch_size=4, lr=0.5, warmup_epochs=0), val=val,
                    on_epoch_end=lambda s, m: states.append(s))
    accs = [h["val_acc"] for h in history]
    assert max(accs) > accs[-1], accs  # the set-up is meaningful: picking the best-validated epoch would differ
    assert torch.equal(model.prompt_learner.ctx.detach(), states[-1].ctx)
    assert engine.evaluate(model, val)["acc"] == accs[-1]
