"""Many CoOp configurations trained together on one frozen CLIP: a *pack*.

A sweep's configurations differ only in their context vectors and recipe; CLIP is frozen and shared. So a pack trains
K members in one process with one copy of CLIP, and each step runs **one** text-encoder forward and backward over
every member's prompts at once (different context lengths, class-token positions, unified and class-specific
contexts, class lists). The prompts are laid out flat, without padding (``TextEncoder.forward_segments``): the
start-of-text token once for every prompt of every member, each unified context's prefix once for its classes, a
front-position class name once for every member that opens its prompts with it, each class's remainder up to its
end-of-text token, and the last block only at the end-of-text tokens. This is exact, not an
approximation: the text transformer is causal and reads each prompt at its own end-of-text position, so a token's
state depends only on the tokens before it in its own prompt, which is what each segment attends to; and the members'
losses are summed, so each member's context gets exactly its own loss's gradient (the frozen weights take none). What
differs from a member's solo run (:func:`coop_core.engine.train`) is only float rounding: the batch's reductions run
in another order. The rest of the step is batched too: the members' logits and losses in one batched product, and
one multi-tensor SGD update (the arithmetic of each member's ``torch.optim.SGD``) for the members sharing a learning
rate; validation encodes every member due for it in one pass, and that pass, run with autograd on, is the next
epoch's first step's text forward (the contexts have not moved since).

Everything else is the member's own, as in its solo run: its training data (its shots and seed: the same
``global_batches`` and cached-view draws), SGD with its own momentum, weight decay, learning rate and CoOp schedule,
its epoch count, its validation, its reports and checkpoints (``TrainState``, so a member resumes alone), and its
failure: a member whose loss or gradient becomes NaN or infinite stops at that step, before its context is touched,
with the same message as a solo run, and the others go on (rows do not mix, so a NaN stays in its own rows).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
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
from coop_core.text_encoder import Segments, segments

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


@dataclass(frozen=True)
class _PackedPrompts:
    """The prompts of a set of members laid out flat for :meth:`TextEncoder.forward_segments` (see the module
    docstring): built once per set of members stepping together, reused at every step.

    base: ``(T, width)`` each token's frozen embedding (zero at context slots), the token embedding's dtype. pos:
    ``(T, width)`` its positional embedding, in the transformer's dtype. ctx_token: ``(Tc,)`` the context slots'
    flat tokens; ctx_row: ``(Tc,)`` the row of the members' concatenated contexts each one takes. seg: the layout.
    n_cls: each member's class count, in member order (the features come out in that order).
    """

    base: torch.Tensor
    pos: torch.Tensor
    ctx_token: torch.Tensor
    ctx_row: torch.Tensor
    seg: Segments
    n_cls: tuple[int, ...]

    @classmethod
    def build(cls, models: Sequence[CoOpModel]) -> _PackedPrompts:
        """Segments: one start-of-text token shared by every prompt; per member, its shared prefix (a unified
        context's start, ``CoOpModel.shared_prefix`` positions) when it has one; the frozen tokens that open a prompt
        after its start token (a front-position class name, before the context) once for every prompt of the pack
        that opens with the same ones; per class, the rest of its prompt up to its end-of-text token.

        Sharing frozen tokens is exact whatever the members: they hold no context, so their states (the causal
        transformer's, at the same positions) are the same in every prompt that opens with them, and no gradient is
        routed through them to a member."""
        encoder = models[0].text_encoder
        cast = encoder.transformer.get_cast_dtype()
        first = models[0].prompt_learner
        width = first.token_prefix.shape[-1]
        device = first.token_prefix.device
        base, pos, is_ctx, rows = [first.token_prefix[0, :1]], [torch.zeros(1, dtype=torch.long, device=device)], [
            torch.zeros(1, dtype=torch.bool, device=device)], [torch.zeros(1, dtype=torch.long, device=device)]
        parents, lengths, eot = [-1], [1], []
        tokens, row_offset = 1, 0
        heads: dict[tuple[int, ...], int] = {}  # frozen opening tokens (their ids) -> their segment
        for model in models:
            pl = model.prompt_learner
            n_cls, n_ctx = pl.n_cls, pl.n_ctx
            length = int(pl.eot_idx.max()) + 1
            positions = torch.arange(length, device=device)
            src = positions.expand(n_cls, length) if pl.class_token_position == "end" else pl.gather_index[:, :length]
            frozen = torch.cat([pl.token_prefix, pl.token_prefix.new_zeros(n_cls, n_ctx, width), pl.token_suffix], 1)
            emb = torch.gather(frozen, 1, src.unsqueeze(-1).expand(-1, -1, width))  # (n_cls, length, width)
            ctx = (src >= 1) & (src <= n_ctx)  # (n_cls, length): a context slot
            row = row_offset + src - 1  # unified: the slot's row of this member's context
            if pl.csc:
                row = row + n_ctx * torch.arange(n_cls, device=device).unsqueeze(1)
            prefix = model.shared_prefix
            if prefix > 1:  # positions 1..prefix-1 are the same in every class's prompt by construction
                base.append(emb[0, 1:prefix])
                pos.append(positions[1:prefix])
                is_ctx.append(ctx[0, 1:prefix])
                rows.append(row[0, 1:prefix])
                class_parents = [len(lengths)] * n_cls
                parents.append(0)
                lengths.append(prefix - 1)
                tokens += prefix - 1
                start = torch.full((n_cls,), prefix, dtype=torch.long, device=device)
            else:  # each class's frozen tokens before its first context slot (a front class name), shared by token
                # ids (every member embeds them with the pack's one CLIP); without a context slot, all before the
                # end-of-text token, which is never shared
                class_parents = [0] * n_cls
                start = torch.where(ctx.any(1), ctx.long().argmax(1), pl.eot_idx)
                ids = pl.tokenized_prompts.gather(1, src)  # (n_cls, length): the token at each position
                for c in range(n_cls):
                    n = int(start[c]) - 1
                    if n == 0:
                        continue
                    key = tuple(ids[c, 1:1 + n].tolist())
                    if key not in heads:
                        heads[key] = len(lengths)
                        base.append(emb[c, 1:1 + n])
                        pos.append(positions[1:1 + n])
                        is_ctx.append(ctx[c, 1:1 + n])
                        rows.append(row[c, 1:1 + n])
                        parents.append(0)
                        lengths.append(n)
                        tokens += n
                    class_parents[c] = heads[key]
            keep = (positions >= start.unsqueeze(1)) & (positions <= pl.eot_idx.unsqueeze(1))  # (n_cls, length)
            base.append(emb[keep])
            pos.append(positions.expand(n_cls, length)[keep])
            is_ctx.append(ctx[keep])
            rows.append(row[keep])
            own = (pl.eot_idx - start + 1).tolist()
            parents.extend(class_parents)
            lengths.extend(own)
            ends = tokens - 1 + torch.tensor(own).cumsum(0)
            eot.extend(ends.tolist())
            tokens = int(ends[-1]) + 1
            row_offset += pl.ctx.numel() // width
        is_ctx_all, rows_all = torch.cat(is_ctx), torch.cat(rows)
        pos_all = torch.cat(pos)
        return cls(torch.cat(base), encoder.positional_embedding[pos_all].to(cast), is_ctx_all.nonzero()[:, 0],
                   rows_all[is_ctx_all], segments(parents, lengths, eot, device),
                   tuple(m.prompt_learner.n_cls for m in models))

    def text_features(self, models: Sequence[CoOpModel]) -> list[torch.Tensor]:
        """Every member's normalised class text features ``(n_cls_i, d)`` from one pass over the flat tokens; the
        gradient reaches each member's context."""
        ctx = torch.cat([m.prompt_learner.ctx.reshape(-1, self.base.shape[-1]) for m in models])  # (rows, width)
        emb = self.base.index_put((self.ctx_token,), ctx.index_select(0, self.ctx_row).to(self.base.dtype))
        x = emb.to(self.pos.dtype) + self.pos
        text = F.normalize(models[0].text_encoder.forward_segments(x, self.seg), dim=-1)  # (sum n_cls, d)
        return list(text.split(self.n_cls))


def _padded_text_features(models: Sequence[CoOpModel]) -> list[torch.Tensor]:
    """:meth:`_PackedPrompts.text_features` for towers that cannot run segments: all prompts padded into one batch."""
    learners = [m.prompt_learner for m in models]
    prompts = torch.cat([pl() for pl in learners])  # (sum n_cls, 77, width)
    eot_idx = torch.cat([pl.eot_idx for pl in learners])  # (sum n_cls,)
    text = F.normalize(models[0].text_encoder(prompts, eot_idx), dim=-1)  # (sum n_cls, d)
    return list(text.split([pl.n_cls for pl in learners]))


class _TextStep:
    """The pack's text step for whichever members step together, laid out once per such set.

    A pass run with ``keep=True`` (a validation's, with autograd on) is kept for the next call: when that call asks
    for the same members with their contexts untouched since (the tensors' version counters), which is the next
    epoch's first step after a validation, it takes the kept features and their graph instead of running the same
    pass again. The features are the same either way; one text forward of every epoch's is saved.
    """

    def __init__(self, models: Sequence[CoOpModel]) -> None:
        self.models = list(models)
        self.flat = models[0].text_encoder.segments_ok
        self._layouts: dict[tuple[int, ...], _PackedPrompts] = {}
        self._kept: tuple[tuple[int, ...], tuple[int, ...], list[torch.Tensor]] | None = None

    def __call__(self, which: Sequence[int], *, keep: bool = False) -> list[torch.Tensor]:
        models = [self.models[i] for i in which]
        key = tuple(which)
        versions = tuple(m.prompt_learner.ctx._version for m in models)
        kept, self._kept = self._kept, None  # a kept pass serves the next call or none
        if kept is not None and torch.is_grad_enabled() and kept[:2] == (key, versions):
            return kept[2]
        if not self.flat:
            texts = _padded_text_features(models)
        else:
            if key not in self._layouts:
                with torch.no_grad():
                    self._layouts[key] = _PackedPrompts.build(models)
            texts = self._layouts[key].text_features(models)
        if keep and torch.is_grad_enabled():
            self._kept = (key, versions, texts)
        return texts


def _sgd_step(states: Sequence[_Member]) -> None:
    """``torch.optim.SGD.step`` (dampening 0, no Nesterov: ``make_optimizer``'s) for every member in ``states`` at
    once: one multi-tensor update per group of members sharing lr, momentum and weight decay, the same arithmetic as
    each member's own optimiser; the momentum buffers stay in each optimiser's state (its checkpoints)."""
    groups: dict[tuple[float, float, float, bool], list[_Member]] = {}
    for s in states:
        group = s.opt.param_groups[0]
        p = group["params"][0]
        has_buf = s.opt.state[p].get("momentum_buffer") is not None
        groups.setdefault((group["lr"], group["momentum"], group["weight_decay"], has_buf), []).append(s)
    with torch.no_grad():
        for (lr, momentum, weight_decay, has_buf), members in groups.items():
            params = [s.opt.param_groups[0]["params"][0] for s in members]
            grads = [p.grad for p in params]
            if weight_decay != 0:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
            if momentum != 0:
                if has_buf:
                    bufs = [s.opt.state[p]["momentum_buffer"] for s, p in zip(members, params)]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, grads)
                else:
                    bufs = [g.clone().detach() for g in grads]
                    for s, p, b in zip(members, params, bufs):
                        s.opt.state[p]["momentum_buffer"] = b
                grads = bufs
            torch._foreach_add_(params, grads, alpha=-lr)


def _finite(grads: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each gradient is all finite (one host synchronisation for all of them)."""
    zeros = torch._foreach_mul(list(grads), 0.0)  # 0 where finite, nan where inf or nan
    return torch.stack(torch._foreach_norm(zeros)).isfinite().tolist()


def train_pack(members: Sequence[PackMember], *,
               after_epoch: Callable[[int, Sequence[MemberResult]], None] | None = None,
               stopped: Sequence[int] = ()) -> list[MemberResult]:
    """Train every member of the pack to its last epoch (see the module docstring); one result per member.

    Members run their epochs in lockstep (epoch ``e`` of every member still training, step by step); a member with
    fewer epochs or steps per epoch sits out the rest. ``epoch_time_s`` in a member's metrics is the wall time of the
    pack's epoch it took part in (shared by the members), ``val_time_s`` its share of the pack's validation.

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
    text_step = _TextStep([m.model for m in members])
    index = {id(s): i for i, s in enumerate(states)}
    for m in members:
        m.model.train()
    for epoch in range(min(s.start for s in states), max(s.epochs for s in states)):
        active = [s for s in states if s.start <= epoch < s.epochs and not s.result.done]
        if not active:
            continue
        t0 = time.perf_counter()
        batches, drawn = {}, {}
        for s in active:
            key = (id(s.spec.data), s.spec.cfg.seed, s.spec.cfg.batch_size)  # members drawing the same batches
            if key not in drawn:
                drawn[key] = global_batches(s.spec.data.labels.shape[0], s.spec.cfg.batch_size, s.spec.cfg.seed,
                                            epoch)
            batches[id(s)] = drawn[key]
        lrs = {id(s): s.opt.param_groups[0]["lr"] for s in active}
        sums = torch.zeros(len(active), 3, dtype=torch.float64)  # each active member's summed loss, hits, items
        for step in range(max(len(batches[id(s)]) for s in active)):
            stepping = [j for j, s in enumerate(active) if step < len(batches[id(s)]) and s.result.failure is None]
            if not stepping:
                break
            feats, labels = _inputs([active[j] for j in stepping], batches, step, epoch, device)
            for j in stepping:
                active[j].spec.model.prompt_learner.ctx.grad = None
            with _autocast(precision, device):
                texts = text_step([index[id(active[j])] for j in stepping])
                logits = _logits([active[j].spec.model for j in stepping], feats, texts)  # (k, b, c)
            losses, hits = _losses(logits.float(), labels)  # (k,) each
            losses.sum().backward()  # each context gets its own loss's gradient: the sum is separable
            params = [active[j].spec.model.prompt_learner.ctx for j in stepping]
            ok = []
            for j, p, finite in zip(stepping, params, _finite([p.grad for p in params])):
                s = active[j]
                if not finite:  # before the step: the context keeps its last finite value
                    s.result.failure = str(_diverged("loss gradient", p.grad, epoch, step, lrs[id(s)], precision))
                    logger.warning("pack member %d: %s", index[id(s)], s.result.failure)
                else:
                    ok.append(s)
            _sgd_step(ok)
            n = torch.tensor([len(batches[id(active[j])][step]) for j in stepping], dtype=torch.float64)
            rows = torch.tensor(stepping)
            sums[rows, 0] += losses.detach().double().cpu() * n
            sums[rows, 1] += hits.double().cpu()
            sums[rows, 2] += n
        elapsed = time.perf_counter() - t0
        ended = [(s, float(sums[j, 0]), float(sums[j, 1]), int(sums[j, 2])) for j, s in enumerate(active)
                 if s.result.failure is None]
        validated = _validate([s for s, *_ in ended if _due(s, epoch)], text_step, index, precision, epoch)
        for s, loss_sum, correct, n_seen in ended:
            _end_epoch(s, epoch, lrs[id(s)], elapsed, precision, loss_sum, correct, n_seen, validated.get(id(s)))
        if after_epoch is not None:
            after_epoch(epoch + 1, [s.result for s in states])
    for m in members:
        m.model.prompt_learner.ctx.grad = None
    return [s.result for s in states]


def _inputs(states: Sequence[_Member], batches: dict, step: int, epoch: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stepping members' image features ``(k, b, d)`` and labels ``(k, b)`` of this step, padded to the largest
    batch (label -100 marks padding). Members drawing the same batch from the same data share one copy."""
    feats, labels, done = [], [], {}
    for s in states:
        batch = batches[id(s)][step]
        key = (id(s.spec.data), id(batch))
        if key not in done:
            done[key] = (s.spec.data.batch(batch, epoch), s.spec.data.labels[batch])
        x, y = done[key]
        feats.append(x)
        labels.append(y)
    b = max(len(y) for y in labels)
    if any(len(y) < b for y in labels):
        feats = [F.pad(x, (0, 0, 0, b - len(x))) for x in feats]
        labels = [F.pad(y, (0, b - len(y)), value=-100) for y in labels]
    return torch.stack(feats).to(device), torch.stack(labels).to(device)


def _logits(models: Sequence[CoOpModel], feats: torch.Tensor, texts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's logits ``(k, b, c)``: ``CoOpModel.logits`` of its images and classes, batched; classes padded
    to the most (with -inf: no probability, no gradient)."""
    c = max(t.shape[0] for t in texts)
    if any(t.shape[0] < c for t in texts):
        texts = [F.pad(t, (0, 0, 0, c - t.shape[0])) for t in texts]
        pad = torch.tensor([[j >= m.prompt_learner.n_cls for j in range(c)] for m in models], device=feats.device)
    else:
        pad = None
    logits = models[0].logit_scale.exp() * feats @ torch.stack(texts).transpose(1, 2).to(feats.dtype)  # (k, b, c)
    return logits if pad is None else logits.masked_fill(pad.unsqueeze(1), float("-inf"))


def _losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's mean cross-entropy over its batch (the solo step's loss) and its correct predictions."""
    k, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(k * b, c), labels.reshape(-1), reduction="none").view(k, b)
    valid = labels >= 0
    losses = ce.sum(1) / valid.sum(1)
    hits = ((logits.argmax(-1) == labels) & valid).sum(1)
    return losses, hits


def _due(s: _Member, epoch: int) -> bool:
    cfg = s.spec.cfg
    return s.spec.val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == s.epochs)


def _validate(states: Sequence[_Member], text_step: _TextStep, index: dict[int, int], precision: str, epoch: int
              ) -> dict[int, dict[str, float]]:
    """The validation metrics of the members due for it after ``epoch`` (0-based), their text features from one pass
    (``evaluate``'s), kept for the next epoch's first step while one of them trains on."""
    if not states:
        return {}
    t0 = time.perf_counter()
    device = states[0].spec.model.prompt_learner.ctx.device
    # With autograd on while a member trains on: the next epoch's first step takes this pass (``_TextStep``).
    keep = any(epoch + 1 < s.epochs for s in states)
    with torch.set_grad_enabled(keep), _autocast(precision, device):
        texts = [t.detach() for t in text_step([index[id(s)] for s in states], keep=keep)]
    shared = (time.perf_counter() - t0) / len(states)
    out = {}
    for s, text in zip(states, texts):
        t_own = time.perf_counter()
        v = evaluate(s.spec.model, s.spec.val, precision, text=text)
        out[id(s)] = {"val_acc": v["acc"], "val_macro_f1": v["macro_f1"],
                      "val_time_s": shared + time.perf_counter() - t_own}
    return out


def _end_epoch(s: _Member, epoch: int, lr: float, elapsed: float, precision: str, loss_sum: float, correct: float,
               seen: int, val: dict[str, float] | None) -> None:
    """A member's epoch end, as ``coop_core.engine.train`` ends one: schedule, metrics, validation, callbacks."""
    m = s.spec
    with warnings.catch_warnings():  # the pack steps the members' parameters itself (_sgd_step), not opt.step()
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        s.sched.step()
    if seen and not math.isfinite(loss_sum):
        s.result.failure = str(_diverged("training loss", torch.tensor(loss_sum), epoch, None, lr, precision))
        return
    metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_acc": 100.0 * correct / max(seen, 1), "lr": lr, "epoch_time_s": elapsed, **(val or {})}
    s.result.history.append(metrics)
    if m.on_epoch_end is not None:
        state = TrainState(epoch + 1, m.model.prompt_learner.ctx.detach().cpu().clone(),
                           copy.deepcopy(s.opt.state_dict()), s.sched.state_dict(), None, torch.get_rng_state())
        m.on_epoch_end(state, metrics)
    if m.report is not None:
        m.report(metrics)
    if m.should_stop is not None and epoch + 1 < s.epochs and m.should_stop(metrics):
        s.result.stopped_after = epoch + 1
