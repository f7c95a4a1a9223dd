"""Many CoOp configurations trained together on one frozen CLIP: a *pack*.

A sweep's configurations differ only in their context vectors and recipe; CLIP is frozen and shared. So a pack trains
K members in one process with one copy of CLIP, and each step runs **one** text-encoder forward and backward over
every member's prompts at once (different context lengths, class-token positions, unified and class-specific
contexts, class lists: all padded into one batch of full-length prompts, truncated at the longest end-of-text
token). This is exact, not an approximation: the text transformer is causal and reads each prompt at its own
end-of-text position, so padding after it changes nothing; each row of the batch attends only to itself; and the
members' losses are summed, so each member's context gets exactly its own loss's gradient (the frozen weights take
none). What differs from a member's solo run (:func:`coop_core.engine.train`) is only float rounding: the batch's
reductions run in another order and a solo unified context computes its shared prompt prefix once.

Everything else is the member's own, as in its solo run: its training data (its shots and seed: the same
``global_batches`` and cached-view draws), SGD with its own momentum, weight decay, learning rate and CoOp schedule,
its epoch count, its validation, its reports and checkpoints (``TrainState``, so a member resumes alone), and its
failure: a member whose loss or gradient becomes NaN or infinite stops at that step, before its context is touched,
with the same message as a solo run, and the others go on (rows do not mix, so a NaN stays in its own rows).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from coop_core.config import TrainConfig
from coop_core.engine import (
    TrainState,
    _autocast,
    _diverged,
    evaluate,
    global_batches,
    make_optimizer,
)
from coop_core.features import FeatureSet, TrainSource
from coop_core.model import CoOpModel

logger = logging.getLogger(__name__)


@dataclass
class PackMember:
    """One configuration of a pack: what :func:`coop_core.engine.train` takes for a solo run.

    model: its CoOp model, built on the pack's CLIP (``coop_core.pipeline.build_model`` with the same ``LoadedClip``).
    data, cfg, val: its training features, recipe and validation features. report, on_epoch_end, resume: as in
    ``train`` (the metrics of each of its epochs; its resumable state after each epoch; the state to continue from).
    should_stop: asked with each epoch's metrics after ``report``; True ends the member's training there (an
    early-stopping decision such as ASHA's), the other members go on.
    """

    model: CoOpModel
    data: TrainSource
    cfg: TrainConfig
    val: FeatureSet | None = None
    report: Callable[[dict[str, float]], None] | None = None
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None
    resume: TrainState | None = None
    should_stop: Callable[[dict[str, float]], bool] | None = None


@dataclass
class MemberResult:
    """How a member's training ended: its per-epoch metrics, why it stopped early (a diverged loss) or None, and
    the epoch after which ``should_stop`` stopped it (an early-stopping rule) or None."""

    history: list[dict[str, float]] = field(default_factory=list)
    failure: str | None = None
    stopped_after: int | None = None

    @property
    def done(self) -> bool:
        return self.failure is not None or self.stopped_after is not None


@dataclass
class _Member:
    """A member's training state inside :func:`train_pack`."""

    spec: PackMember
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    start: int
    epochs: int
    result: MemberResult
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0


def _check_pack(members: Sequence[PackMember]) -> None:
    if not members:
        raise ValueError("a pack needs at least one member")
    first = members[0]
    for i, m in enumerate(members):
        if m.model.logit_scale is not first.model.logit_scale:
            raise ValueError(f"pack member {i} is built on another CLIP: every member's model must come from the "
                             "pack's one LoadedClip (coop_core.pipeline.build_model with the same clip)")
        if m.cfg.precision != first.cfg.precision:
            raise ValueError(f"pack member {i} trains in {m.cfg.precision}, member 0 in {first.cfg.precision}: a "
                             "pack runs one text step for all, in one precision")
        if m.model.prompt_learner.ctx.device != first.model.prompt_learner.ctx.device:
            raise ValueError(f"pack member {i} is on another device than member 0")
        if m.cfg.precision == "amp":
            raise ValueError("precision 'amp' (loss scaling) is not supported in a pack; use fp32 or bf16")


def _start(m: PackMember) -> _Member:
    opt, sched = make_optimizer(m.model, m.cfg)
    start = 0
    if m.resume is not None:
        with torch.no_grad():
            m.model.prompt_learner.ctx.copy_(m.resume.ctx.to(m.model.prompt_learner.ctx.device))
        opt.load_state_dict(m.resume.optimizer)
        sched.load_state_dict(m.resume.scheduler)
        start = m.resume.epoch
    return _Member(m, opt, sched, start, m.cfg.resolved_epochs, MemberResult())


def _text_features(members: Sequence[_Member]) -> list[torch.Tensor]:
    """Every member's normalised class text features ``(n_cls_i, d)`` from one text-encoder pass over all prompts."""
    learners = [m.spec.model.prompt_learner for m in members]
    prompts = torch.cat([pl() for pl in learners])  # (sum n_cls, 77, width)
    eot_idx = torch.cat([pl.eot_idx for pl in learners])  # (sum n_cls,)
    text = F.normalize(members[0].spec.model.text_encoder(prompts, eot_idx), dim=-1)  # (sum n_cls, d)
    return list(text.split([pl.n_cls for pl in learners]))


def train_pack(members: Sequence[PackMember], *,
               after_epoch: Callable[[int, Sequence[MemberResult]], None] | None = None,
               stopped: Sequence[int] = ()) -> list[MemberResult]:
    """Train every member of the pack to its last epoch (see the module docstring); one result per member.

    Members run their epochs in lockstep (epoch ``e`` of every member still training, step by step); a member with
    fewer epochs or steps per epoch sits out the rest. ``epoch_time_s`` in a member's metrics is the wall time of the
    pack's epoch it took part in (shared by the members), ``val_time_s`` its own validation.

    ``after_epoch(epoch, results)`` is called once the members of the pack's epoch ``epoch`` (1-based) all ended it,
    with every member's result so far (a pack's checkpoint; a diverged member's ``failure`` is set).
    ``stopped``: members that an early-stopping rule already ended (a resumed pack): they do not train.

    Raises:
        ValueError: members on different CLIPs, devices or precisions.
    """
    _check_pack(members)
    states = [_start(m) for m in members]
    for i in stopped:
        states[i].result.stopped_after = states[i].start
    device = members[0].model.prompt_learner.ctx.device
    precision = members[0].cfg.precision
    _autocast(precision, device)  # validates the precision for this device before any work
    for epoch in range(min(s.start for s in states), max(s.epochs for s in states)):
        active = [s for s in states if s.start <= epoch < s.epochs and not s.result.done]
        if not active:
            continue
        t0 = time.perf_counter()
        batches = {id(s): global_batches(s.spec.data.labels.shape[0], s.spec.cfg.batch_size, s.spec.cfg.seed, epoch)
                   for s in active}
        lrs = {id(s): s.opt.param_groups[0]["lr"] for s in active}
        for s in active:
            s.spec.model.train()
            s.loss_sum, s.correct, s.seen = 0.0, 0.0, 0
        for step in range(max(len(b) for b in batches.values())):
            stepping = [s for s in active if step < len(batches[id(s)]) and s.result.failure is None]
            if not stepping:
                break
            inputs = []
            for s in stepping:
                s.opt.zero_grad(set_to_none=False)
                batch = batches[id(s)][step]
                inputs.append((s.spec.data.batch(batch, epoch).to(device), s.spec.data.labels[batch].to(device)))
            with _autocast(precision, device):
                texts = _text_features(stepping)
                logits = [s.spec.model.logits(x, t) for s, (x, _), t in zip(stepping, inputs, texts)]
            losses = [F.cross_entropy(lg.float(), y, reduction="sum") / len(y) for lg, (_, y) in zip(logits, inputs)]
            torch.stack(losses).sum().backward()  # each context gets its own loss's gradient: the sum is separable
            for s, loss, lg, (_, y) in zip(stepping, losses, logits, inputs):
                grad = s.spec.model.prompt_learner.ctx.grad
                if not bool(torch.isfinite(grad).all()):  # before the step: the context keeps its last finite value
                    s.result.failure = str(_diverged("loss gradient", grad, epoch, step, lrs[id(s)], precision))
                    logger.warning("pack member %d: %s", states.index(s), s.result.failure)
                    continue
                s.opt.step()
                s.loss_sum += float(loss.detach()) * len(y)
                s.correct += float((lg.argmax(-1) == y).sum())
                s.seen += len(y)
        elapsed = time.perf_counter() - t0
        for s in active:
            if s.result.failure is None:
                _end_epoch(s, epoch, lrs[id(s)], elapsed, precision)
        if after_epoch is not None:
            after_epoch(epoch + 1, [s.result for s in states])
    return [s.result for s in states]


def _end_epoch(s: _Member, epoch: int, lr: float, elapsed: float, precision: str) -> None:
    """A member's epoch end, as ``coop_core.engine.train`` ends one: schedule, metrics, validation, callbacks."""
    m = s.spec
    s.sched.step()
    if s.seen and not torch.isfinite(torch.tensor(s.loss_sum)):
        s.result.failure = str(_diverged("training loss", torch.tensor(s.loss_sum), epoch, None, lr, precision))
        return
    metrics = {"epoch": epoch + 1, "train_loss": s.loss_sum / max(s.seen, 1),
               "train_acc": 100.0 * s.correct / max(s.seen, 1), "lr": lr, "epoch_time_s": elapsed}
    if m.val is not None and ((epoch + 1) % m.cfg.eval_every == 0 or epoch + 1 == s.epochs):
        t_val = time.perf_counter()
        v = evaluate(m.model, m.val, m.cfg.precision)
        metrics.update(val_acc=v["acc"], val_macro_f1=v["macro_f1"], val_time_s=time.perf_counter() - t_val)
    s.result.history.append(metrics)
    if m.on_epoch_end is not None:
        state = TrainState(epoch + 1, m.model.prompt_learner.ctx.detach().cpu().clone(),
                           copy.deepcopy(s.opt.state_dict()), s.sched.state_dict(), None, torch.get_rng_state())
        m.on_epoch_end(state, metrics)
    if m.report is not None:
        m.report(metrics)
    if m.should_stop is not None and epoch + 1 < s.epochs and m.should_stop(metrics):
        s.result.stopped_after = epoch + 1
