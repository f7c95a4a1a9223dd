"""A pack (``coop_core.pack.train_pack``): many configurations trained in one text step per batch on one CLIP, each
member's trajectory its solo run's (``coop_core.engine.train``) up to float rounding in another order."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from numerics import FORWARD_BACKWARD, ONE_PASS, TRAJECTORY, assert_reordered, assert_reordered_scalar

from coop_core.config import PromptConfig, TrainConfig
from coop_core.engine import NonFiniteLossError, train
from coop_core.features import CachedViews, FeatureSet
from coop_core.model import CoOpModel
from coop_core.pack import PackMember, train_pack

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["annual_crop_land", "forest", "highway", "sea_or_lake", "herbaceous_vegetation_land"]
D = 32  # the tiny CLIP's embedding width


def _views(n: int, n_cls: int, seed: int) -> CachedViews:
    g = torch.Generator().manual_seed(seed)
    return CachedViews(F.normalize(torch.randn(2, n, D, generator=g), dim=-1), torch.randint(n_cls, (n,), generator=g),
                       seed=seed)


def _val(n_cls: int, seed: int) -> FeatureSet:
    g = torch.Generator().manual_seed(100 + seed)
    return FeatureSet(F.normalize(torch.randn(15, D, generator=g), dim=-1), torch.randint(n_cls, (15,), generator=g))


# A heterogeneous pack: unified and class-specific contexts, the three class positions, n_ctx 4 and 16 (and one set by
# ctx_init), two learning rates, two "shot counts" (training sets of 20 and 10 items), other class lists, batch sizes,
# seeds and epoch counts.
CONFIGS = [
    dict(prompt=PromptConfig(n_ctx=4), train=TrainConfig(lr=0.002, epochs=4, batch_size=5, seed=1, warmup_epochs=1),
         n=20, classes=5),
    dict(prompt=PromptConfig(n_ctx=16, csc=True, class_token_position="middle"),
         train=TrainConfig(lr=0.05, epochs=3, batch_size=4, seed=2, warmup_epochs=0), n=10, classes=5),
    dict(prompt=PromptConfig(n_ctx=16, class_token_position="front"),
         train=TrainConfig(lr=0.05, epochs=4, batch_size=5, seed=3, warmup_epochs=1), n=20, classes=3),
    dict(prompt=PromptConfig(n_ctx=4, csc=True, class_token_position="end"),
         train=TrainConfig(lr=0.002, epochs=2, batch_size=3, seed=4, warmup_epochs=0), n=10, classes=4),
    dict(prompt=PromptConfig(ctx_init="a centered satellite photo of", class_token_position="middle"),
         train=TrainConfig(lr=0.05, epochs=3, batch_size=5, seed=5, warmup_epochs=0), n=20, classes=5),
    dict(prompt=PromptConfig(n_ctx=4, csc=True, class_token_position="front"),  # opens with member 2's class names
         train=TrainConfig(lr=0.002, epochs=3, batch_size=4, seed=6, warmup_epochs=1), n=10, classes=5),
]


def _member(clip, config: dict, i: int, **overrides) -> PackMember:
    names = CLASSNAMES[: config["classes"]]
    model = CoOpModel(clip.model, clip.tokenizer, names, config["prompt"], generator=torch.Generator().manual_seed(i))
    cfg = dataclasses.replace(config["train"], **overrides)
    return PackMember(model, _views(config["n"], len(names), seed=i), cfg, val=_val(len(names), i))


def _solo(member: PackMember) -> tuple[list[dict], torch.Tensor]:
    model = copy.deepcopy(member.model)  # the same initial context, trained alone
    history = train(model, member.data, member.cfg, val=member.val)
    return history, model.prompt_learner.ctx.detach()


def _same(pack_history, pack_ctx, solo_history, solo_ctx, what: str) -> None:
    assert [h["epoch"] for h in pack_history] == [h["epoch"] for h in solo_history], what
    for p, s in zip(pack_history, solo_history):
        assert p["lr"] == s["lr"], what  # the member's own schedule, exactly
        assert_reordered_scalar(p["train_loss"], s["train_loss"], TRAJECTORY, f"{what} epoch {p['epoch']} loss")
        assert p["train_acc"] == pytest.approx(s["train_acc"]), what
        assert ("val_acc" in p) == ("val_acc" in s), what
    assert_reordered(pack_ctx, solo_ctx, TRAJECTORY, f"{what} context")


def test_every_member_of_a_heterogeneous_pack_follows_its_solo_trajectory(tiny_clip):
    members = [_member(tiny_clip, c, i) for i, c in enumerate(CONFIGS)]
    solos = [_solo(m) for m in members]  # before the pack trains the members' own models in place
    results = train_pack(members)
    for i, (m, r, (history, ctx)) in enumerate(zip(members, results, solos)):
        assert r.failure is None
        _same(r.history, m.model.prompt_learner.ctx.detach(), history, ctx, f"member {i}")
        assert len(r.history) == m.cfg.resolved_epochs  # each its own epoch count


def test_a_diverging_member_fails_alone_with_its_solo_message(tiny_clip):
    members = [_member(tiny_clip, CONFIGS[0], 0), _member(tiny_clip, CONFIGS[1], 1, lr=1e30),
               _member(tiny_clip, CONFIGS[2], 2)]
    bad = copy.deepcopy(members[1].model)
    with pytest.raises(NonFiniteLossError) as solo_failure:
        train(bad, members[1].data, members[1].cfg)
    solos = [_solo(members[0]), _solo(members[2])]
    before = members[1].model.prompt_learner.ctx.detach().clone()
    results = train_pack(members)
    assert results[1].failure == str(solo_failure.value)
    assert torch.isfinite(members[1].model.prompt_learner.ctx).all()  # stopped before the step that would poison it
    assert not torch.equal(members[1].model.prompt_learner.ctx, before) or results[1].history == []
    for i, (history, ctx) in zip((0, 2), solos):
        _same(results[i].history, members[i].model.prompt_learner.ctx.detach(), history, ctx, f"member {i}")


def test_a_member_resumed_from_its_checkpoint_continues_its_trajectory(tiny_clip):
    straight = [_member(tiny_clip, c, i) for i, c in enumerate(CONFIGS[:3])]
    resumed = [_member(tiny_clip, c, i) for i, c in enumerate(CONFIGS[:3])]
    kept = {}
    straight[0].on_epoch_end = lambda state, metrics: kept.setdefault(state.epoch, state)
    train_pack(straight)
    resumed[0].resume = kept[2]  # member 0 continues after its epoch 2; the others start from scratch
    results = train_pack(resumed)
    assert [h["epoch"] for h in results[0].history] == [3, 4]
    assert torch.equal(resumed[0].model.prompt_learner.ctx, straight[0].model.prompt_learner.ctx)


def test_a_pack_needs_one_clip_and_one_precision(tiny_clip, tiny_vit_config):
    from coop_core.backbone import load_clip

    other = load_clip(tiny_vit_config, "none")
    members = [_member(tiny_clip, CONFIGS[0], 0), _member(other, CONFIGS[1], 1)]
    with pytest.raises(ValueError, match="pack member 1 is built on another CLIP"):
        train_pack(members)
    members = [_member(tiny_clip, CONFIGS[0], 0), _member(tiny_clip, CONFIGS[1], 1, precision="bf16")]
    with pytest.raises(ValueError, match="pack member 1 trains in bf16, member 0 in fp32"):
        train_pack(members)
    with pytest.raises(ValueError, match="at least one member"):
        train_pack([])


def test_a_member_stopped_by_its_rule_ends_alone_and_the_pack_checkpoints_after_each_epoch(tiny_clip):
    members = [_member(tiny_clip, c, i) for i, c in enumerate(CONFIGS[:3])]
    solos = [_solo(m) for m in members]
    asked = []
    members[1].should_stop = lambda metrics: asked.append(metrics["epoch"]) or metrics["epoch"] == 2
    ends = []
    results = train_pack(members, after_epoch=lambda epoch, rs: ends.append((epoch, [r.stopped_after for r in rs])))
    assert asked == [1, 2]  # asked after each epoch until it said stop (never at its last epoch)
    assert results[1].stopped_after == 2 and [h["epoch"] for h in results[1].history] == [1, 2]
    _same(results[1].history, members[1].model.prompt_learner.ctx.detach(), solos[1][0][:2],
          members[1].model.prompt_learner.ctx.detach(), "member 1 up to its stop")
    for i in (0, 2):  # the others run on, their trajectories untouched
        assert results[i].stopped_after is None
        _same(results[i].history, members[i].model.prompt_learner.ctx.detach(), *solos[i], f"member {i}")
    assert ends == [(1, [None, None, None]), (2, [None, 2, None]), (3, [None, 2, None]), (4, [None, 2, None])]


def test_a_resumed_pack_leaves_its_stopped_members_stopped(tiny_clip):
    members = [_member(tiny_clip, c, i) for i, c in enumerate(CONFIGS[:2])]
    before = members[1].model.prompt_learner.ctx.detach().clone()
    results = train_pack(members, stopped=[1])
    assert results[1].history == [] and results[1].stopped_after == 0
    assert torch.equal(members[1].model.prompt_learner.ctx, before)
    assert len(results[0].history) == members[0].cfg.resolved_epochs


@pytest.mark.parametrize("arch", ["vit", "custom_text"])
def test_one_flat_text_pass_gives_every_member_its_own_features_and_gradients(arch, tiny_clip, tiny_vit_config,
                                                                                tmp_path):
    """The pack's text step (segments: the shared start token, each unified prefix once, no padding; the last block
    only at the end-of-text tokens) against each member's own ``text_features`` with its own truncation."""
    from coop_core.backbone import load_clip
    from coop_core.pack import _PackedPrompts

    if arch == "vit":
        clip = tiny_clip
    else:
        config = json.loads(open(tiny_vit_config).read()) | {"custom_text": True}
        (tmp_path / "custom.json").write_text(json.dumps(config))
        clip = load_clip(str(tmp_path / "custom.json"), "none")
    models = [_member(clip, c, i).model for i, c in enumerate(CONFIGS)]
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(m.prompt_learner.n_cls, D, generator=g) for m in models]  # a loss that reads every row

    packed = _PackedPrompts.build(models).text_features(models)
    sum((t * w).sum() for t, w in zip(packed, weights)).backward()
    packed_grads = [m.prompt_learner.ctx.grad.clone() for m in models]
    for m in models:
        m.prompt_learner.ctx.grad = None
    for i, (m, w, t, grad) in enumerate(zip(models, weights, packed, packed_grads)):
        own = m.text_features()
        (own * w).sum().backward()
        assert_reordered(t, own, ONE_PASS, f"member {i} text features")
        assert_reordered(grad, m.prompt_learner.ctx.grad, FORWARD_BACKWARD, f"member {i} context gradient")


def test_front_class_names_are_encoded_once_for_the_pack(tiny_clip):
    from coop_core.pack import _PackedPrompts

    unified, csc = (_member(tiny_clip, CONFIGS[i], i).model for i in (2, 5))  # front; 3 and 5 classes
    alone = [_PackedPrompts.build([m]).seg.n_tokens for m in (unified, csc)]
    together = _PackedPrompts.build([unified, csc]).seg.n_tokens
    # one start token, and the 3 class names that open both members' prompts, once
    assert together == sum(alone) - 1 - sum(unified.prompt_learner.name_lens)


def test_the_next_epochs_first_step_takes_the_validation_pass(tiny_clip, monkeypatch):
    """A validation pass with autograd on is the next epoch's first text forward: one forward an epoch fewer, and
    the same trajectory, bit for bit, as a pack that runs that forward again."""
    from coop_core import pack
    from coop_core.text_encoder import TextEncoder

    configs = [CONFIGS[0], CONFIGS[2]]  # 4 epochs of 4 steps each, validated after every epoch
    forward, passes = TextEncoder.forward_segments, []

    def counted(self, x, seg):
        passes.append(torch.is_grad_enabled())
        return forward(self, x, seg)

    monkeypatch.setattr(TextEncoder, "forward_segments", counted)
    kept = [_member(tiny_clip, c, i) for i, c in enumerate(configs)]
    kept_results = train_pack(kept)
    kept_passes, passes[:] = list(passes), []
    call = pack._TextStep.__call__
    monkeypatch.setattr(pack._TextStep, "__call__", lambda self, which, keep=False: call(self, which))
    again = [_member(tiny_clip, c, i) for i, c in enumerate(configs)]
    again_results = train_pack(again)
    assert len(passes) == 4 * (4 + 1)  # every epoch: 4 steps and a validation
    assert len(kept_passes) == len(passes) - 3  # the validations after epochs 1-3 were the next steps' forwards
    assert kept_passes[-1] is False  # the last validation, which no step follows, runs without autograd
    for k, a, k_result, a_result in zip(kept, again, kept_results, again_results):
        assert torch.equal(k.model.prompt_learner.ctx, a.model.prompt_learner.ctx)
        assert [h["train_loss"] for h in k_result.history] == [h["train_loss"] for h in a_result.history]
        # validation read features from a pass with autograd on: the same up to the kernels' rounding
        assert [h["val_acc"] for h in k_result.history] == pytest.approx([h["val_acc"] for h in a_result.history])


def test_a_tower_that_cannot_run_segments_packs_its_prompts_padded(tiny_vit_config):
    from coop_core.backbone import load_clip

    clip = load_clip(tiny_vit_config, "none")
    clip.model.set_grad_checkpointing(True)  # open_clip's checkpointed blocks: not the plain ones segments reproduce
    members = [_member(clip, c, i) for i, c in enumerate(CONFIGS[:3])]
    assert not members[0].model.text_encoder.segments_ok
    solos = [_solo(m) for m in members]
    results = train_pack(members)
    for i, (m, r, (history, ctx)) in enumerate(zip(members, results, solos)):
        _same(r.history, m.model.prompt_learner.ctx.detach(), history, ctx, f"member {i}")
