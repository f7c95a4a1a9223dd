"""The training and evaluation loops: batching, metrics, sharded-gradient maths, resume and precision."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from numerics import TRAJECTORY, assert_reordered, assert_reordered_scalar
from sklearn.metrics import f1_score

from coop_core.config import PromptConfig, TrainConfig
from coop_core.distributed import class_shards
from coop_core.engine import SingleProcess, TrainState, evaluate, global_batches, macro_f1, train
from coop_core.features import CachedViews, FeatureSet
from coop_core.model import CoOpModel

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["annual_crop_land", "forest", "highway", "sea_or_lake"]
N, D = 23, 32  # 23 training items: with batch 5 the last partial batch (3) is dropped


def _model(clip, seed: int = 0, **prompt) -> CoOpModel:
    prompt = {"n_ctx": 4} | prompt
    return CoOpModel(clip.model, clip.tokenizer, CLASSNAMES, PromptConfig(**prompt),
                     generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data() -> CachedViews:
    g = torch.Generator().manual_seed(0)
    views = F.normalize(torch.randn(3, N, D, generator=g), dim=-1)  # (n_views, n, d)
    labels = torch.randint(len(CLASSNAMES), (N,), generator=g)
    return CachedViews(views, labels, seed=0)


@pytest.fixture(scope="module")
def val() -> FeatureSet:
    g = torch.Generator().manual_seed(1)
    return FeatureSet(F.normalize(torch.randn(17, D, generator=g), dim=-1), torch.randint(4, (17,), generator=g))


# --- batching ---------------------------------------------------------------------------------------------------


def test_global_batches_are_a_seeded_permutation_with_drop_last():
    batches = global_batches(70, 32, seed=1, epoch=3)
    assert [len(b) for b in batches] == [32, 32]  # the partial batch of 6 is dropped
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 64 and 0 <= flat.min() and flat.max() < 70
    again = global_batches(70, 32, seed=1, epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat(global_batches(70, 32, seed=1, epoch=4)), flat)
    assert not torch.equal(torch.cat(global_batches(70, 32, seed=2, epoch=3)), flat)


def test_global_batches_keep_a_lone_partial_batch_and_exact_multiples():
    assert [len(b) for b in global_batches(20, 32, 0, 0)] == [20]  # fewer items than one batch: keep them
    exact = global_batches(64, 32, 0, 0)
    assert [len(b) for b in exact] == [32, 32]
    assert sorted(torch.cat(exact).tolist()) == list(range(64))


# --- metrics ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n_cls = 6
    target = torch.randint(n_cls - 1, (50,), generator=g)  # class 5 never in target ...
    pred = torch.where(torch.rand(50, generator=g) < 0.6, target, torch.randint(n_cls, (50,), generator=g))
    expected = f1_score(target.numpy(), pred.numpy(), average="macro", zero_division=0)
    assert macro_f1(pred, target, n_cls) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_ignores_classes_absent_from_target_and_prediction():
    target = torch.tensor([0, 0, 2, 2])
    pred = torch.tensor([0, 2, 2, 2])
    # Class 1 and 3 never occur: only classes 0 and 2 are averaged.
    expected = f1_score(target.numpy(), pred.numpy(), average="macro")
    assert macro_f1(pred, target, 4) == pytest.approx(expected)
    assert macro_f1(target, target, 4) == 1.0


def test_evaluate_reports_accuracy_and_macro_f1_of_the_logits(tiny_clip, val):
    model = _model(tiny_clip)
    with torch.no_grad():
        pred = model.forward_features(val.features).argmax(-1)
    metrics = evaluate(model, val, batch_size=5)  # several chunks
    assert metrics["acc"] == pytest.approx(100.0 * (pred == val.labels).float().mean().item())
    assert metrics["macro_f1"] == pytest.approx(100.0 * f1_score(val.labels, pred, average="macro", zero_division=0))


# --- data-parallel gradient maths -------------------------------------------------------------------------------


class ThreadGroup:
    """An in-process process group: one thread per rank, collectives through shared slots and a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = 0
        self.gathers = 0

    def rank(self, rank: int) -> ThreadRank:
        return ThreadRank(self, rank)


class ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        group = self.group
        group.slots[self.rank] = tensor.detach().clone()
        group.barrier.wait()
        total = group.slots[0].clone()
        for other in group.slots[1:]:  # the same order on every rank: identical results
            total += other
        if self.rank == 0:
            group.calls += 1
        group.barrier.wait()
        tensor.copy_(total)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        group = self.group
        group.slots[self.rank] = tensor.detach().clone()
        group.barrier.wait()
        out = torch.stack(group.slots)
        if self.rank == 0:
            group.gathers += 1
        group.barrier.wait()
        return out


@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
@pytest.mark.parametrize("text_sharding", ["data", "class"])
@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 5), (3, 2)], ids=["2-workers-uneven", "3-workers-empty"])
def test_sharded_training_takes_exactly_the_single_process_steps(tiny_clip, data, world_size, batch_size,
                                                                  text_sharding, csc):
    """N workers on strided shards of each global batch take the step one worker takes on the whole batch.

    Batch 5 over 2 workers gives shards of 3 and 2 (normalising by the shard instead of the global batch would be
    off); batch 2 over 3 workers leaves one worker with an empty shard at every step. Class-sharded, the 4 classes
    split by prompt length into {1, 2} + {0, 3} and {1, 2} + {0} + {3}, not contiguous ranges, and each worker encodes
    only its own (a gather whose backward did not sum the workers' gradients, a CSC context fed only its owner's rows,
    or features not put back into class order, would be off).
    """
    cfg = TrainConfig(epochs=3, batch_size=batch_size, lr=0.05, warmup_epochs=0, text_sharding=text_sharding)
    single = _model(tiny_clip, csc=csc)
    single_history = train(single, data, cfg)

    group = ThreadGroup(world_size)
    models = [_model(tiny_clip, csc=csc) for _ in range(world_size)]
    encoded: list[set[int]] = [set() for _ in range(world_size)]
    for rank, model in enumerate(models):  # prompts per text-encoder call, seen from the test
        model.text_encoder.register_forward_pre_hook(lambda m, args, r=rank: encoded[r].add(args[0].shape[0]))
    histories: list[list[dict] | None] = [None] * world_size
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            histories[rank] = train(models[rank], data, cfg, dist=group.rank(rank))
        except BaseException as err:  # surface failures of the worker threads in the test
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    steps = cfg.resolved_epochs * len(global_batches(N, batch_size, cfg.seed, 0))
    if text_sharding == "class":
        assert [s.tolist() for s in class_shards(single, 2)] == [[1, 2], [0, 3]]  # the docstring's split
        # per step: the gather, its backward's all-reduce, the context gradient's; one stats all-reduce per epoch
        assert (group.gathers, group.calls) == (steps, 2 * steps + cfg.resolved_epochs)
        assert encoded == [{len(s)} for s in class_shards(single, world_size)]
    else:
        assert (group.gathers, group.calls) == (0, steps + cfg.resolved_epochs)
        assert encoded == [{len(CLASSNAMES)}] * world_size

    expected = single.prompt_learner.ctx.detach()
    assert (expected - _model(tiny_clip, csc=csc).prompt_learner.ctx.detach()).abs().max() > 1e-3  # training moved it
    for rank in range(world_size):
        # Equal up to float summation order; normalising by the shard size would be off by ~the ctx change itself.
        assert_reordered(models[rank].prompt_learner.ctx, expected, TRAJECTORY, f"rank {rank}'s context vs one process")
        for h_rank, h_single in zip(histories[rank], single_history):
            assert_reordered_scalar(h_rank["train_loss"], h_single["train_loss"], TRAJECTORY, "epoch loss")
            assert h_rank["train_acc"] == pytest.approx(h_single["train_acc"])


# --- resume, callbacks, precision -------------------------------------------------------------------------------


def test_resume_from_an_epoch_end_state_reproduces_the_straight_run(tiny_clip, data, val):
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.05)  # momentum 0.9: the optimiser state matters
    straight = _model(tiny_clip)
    states = {}
    straight_history = train(straight, data, cfg, val=val, on_epoch_end=lambda s, m: states.__setitem__(s.epoch, s))
    assert sorted(states) == [1, 2, 3, 4]

    resumed = _model(tiny_clip)
    resumed_history = train(resumed, data, cfg, val=val, resume=states[2])
    assert [h["epoch"] for h in resumed_history] == [3, 4]
    assert torch.equal(resumed.prompt_learner.ctx, straight.prompt_learner.ctx)
    for got, want in zip(resumed_history, straight_history[2:]):
        assert {k: v for k, v in got.items() if not k.endswith("_time_s")} == {
            k: v for k, v in want.items() if not k.endswith("_time_s")}


def test_resume_state_survives_a_round_trip_through_a_file(tiny_clip, data, tmp_path):
    """``TrainState.to_dict`` is plain tensors and containers: it saves and loads with ``weights_only=True``."""
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05)
    straight = _model(tiny_clip)

    def checkpoint(state: TrainState, metrics: dict) -> None:
        if state.epoch == 1:
            torch.save(state.to_dict(), tmp_path / "state.pt")

    train(straight, data, cfg, on_epoch_end=checkpoint)
    state = TrainState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert state.epoch == 1
    resumed = _model(tiny_clip)
    train(resumed, data, cfg, resume=state)
    assert torch.equal(resumed.prompt_learner.ctx, straight.prompt_learner.ctx)


def test_report_and_validation_cadence(tiny_clip, data, val):
    reported = []
    cfg = TrainConfig(epochs=3, batch_size=8, eval_every=2)
    history = train(_model(tiny_clip), data, cfg, val=val, report=reported.append)
    assert reported == history
    assert ["val_acc" in h for h in history] == [False, True, True]  # every 2nd epoch and the last
    seen = (N // 8) * 8  # the items of an epoch's full batches: the partial batch is dropped
    for h in history:
        correct = h["train_acc"] * seen / 100.0  # a share of the epoch's items, not of the data set or the batches
        assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= seen, h["train_acc"]
        assert math.isfinite(h["train_loss"]) and h["epoch_time_s"] >= 0


def test_training_fits_learnable_data_with_the_papers_recipe(tiny_clip):
    """Image features are the text features of another context: CoOp's SGD recipe recovers a fitting context."""
    with torch.no_grad():
        text = _model(tiny_clip, seed=7).text_features()  # (n_cls, d)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(len(CLASSNAMES), (64,), generator=g)
    feats = F.normalize(text[labels] + 0.05 * torch.randn(64, text.shape[1], generator=g), dim=-1)
    history = train(_model(tiny_clip, seed=0), CachedViews(feats[None], labels), TrainConfig(epochs=8, batch_size=16))
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < 0.3 * losses[0], losses
    assert history[-1]["train_acc"] >= 95.0


def test_bf16_trains_with_an_fp32_master_context(tiny_clip, data, val):
    model = _model(tiny_clip)
    before = model.prompt_learner.ctx.detach().clone()
    history = train(model, data, TrainConfig(epochs=2, batch_size=8, lr=0.05, precision="bf16"), val=val)
    ctx = model.prompt_learner.ctx
    assert ctx.dtype == torch.float32
    assert (ctx.detach() - before).abs().max() > 0
    assert all(math.isfinite(h["train_loss"]) for h in history)
    fp32 = evaluate(model, val)
    bf16 = evaluate(model, val, precision="bf16")
    assert abs(fp32["acc"] - bf16["acc"]) <= 100.0 * 3 / 17  # a few borderline items may flip


def test_amp_on_cpu_is_refused_with_a_pointer_to_bf16(tiny_clip, data):
    with pytest.raises(ValueError, match="CUDA.*bf16"):
        train(_model(tiny_clip), data, TrainConfig(epochs=1, precision="amp"))


def test_single_process_all_reduce_is_identity():
    t = torch.tensor([1.0, 2.0])
    SingleProcess().all_reduce_sum_(t)
    assert t.tolist() == [1.0, 2.0]
    assert (SingleProcess().rank, SingleProcess().world_size) == (0, 1)


def test_a_non_finite_loss_stops_training_before_the_context_is_touched(tiny_clip, data):
    from coop_core.engine import NonFiniteLossError

    views = data.views.clone()
    views[:, 7] = float("nan")  # one training item's features: its batch gives a NaN loss and gradient
    poisoned = CachedViews(views, data.labels, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=5, lr=0.05, warmup_epochs=0)
    first_step = next(i for i, b in enumerate(global_batches(N, 5, cfg.seed, 0)) if 7 in b.tolist())
    model = _model(tiny_clip)
    with pytest.raises(NonFiniteLossError, match=rf"training diverged: the loss gradient became nan at epoch 1, step "
                                                 rf"{first_step + 1} \(lr 0.05\); lower the learning rate \(--lr\)"):
        train(model, poisoned, cfg)
    assert torch.isfinite(model.prompt_learner.ctx).all()  # raised before the step that would have written NaN

    # Two workers: only one holds the poisoned item in its shard, both stop at the same step (neither waits forever).
    group = ThreadGroup(2)
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            train(_model(tiny_clip), poisoned, cfg, dist=group.rank(rank))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [type(e).__name__ for e in errors] == ["NonFiniteLossError"] * 2
    assert len({str(e) for e in errors}) == 1
