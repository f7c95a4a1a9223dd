"""CoOp's training and evaluation loops: plain functions, one process, distribution injected.

The loop iterates over *global* batches drawn from a generator seeded by ``(seed, epoch)``; a worker of a
multi-worker run takes the strided shard ``batch[rank::world_size]`` of each global batch, computes
``sum(cross_entropy) / len(global batch)`` and the injected ``Distributed.all_reduce_sum_`` adds up the context
gradient, so N workers take exactly the optimisation step one worker would take on the whole batch. The text step is
either repeated on every worker or split by class (``coop_core.distributed``, chosen by ``TrainConfig.text_sharding``).
The core never knows about Ray or process groups; ``SingleProcess`` is the default.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coop_core.config import TrainConfig
from coop_core.distributed import Distributed, SingleProcess, text_sharding_for
from coop_core.features import FeatureSet, TrainSource
from coop_core.methods import Objective
from coop_core.model import CoOpModel

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss (or the context gradient) became NaN or infinite. The message is one line.

    Raised before the optimiser step that would write the non-finite values into the context, and at the same step on
    every worker of a data-parallel run (it is decided on the all-reduced gradient), so no worker is left waiting.
    """


def _diverged(what: str, value: torch.Tensor, epoch: int, step: int | None, lr: float,
              precision: str) -> NonFiniteLossError:
    kind = "nan" if torch.isnan(value).any() else "inf"
    where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
    fix = "lower the learning rate (--lr)" + (", or train in fp32 (--precision fp32)" if precision != "fp32" else "")
    return NonFiniteLossError(f"training diverged: the {what} became {kind} at {where} (lr {lr:.3g}); {fix}")


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """CoOp's learning rate for 0-based ``epoch``, as Dassl's scheduler sets it when stepped once per epoch.

    CoOp wraps ``CosineAnnealingLR(T_max=epochs)`` in Dassl's ``ConstantWarmupScheduler`` with Dassl's default
    ``WARMUP_RECOUNT=True``: the first ``warmup_epochs`` epochs run at ``warmup_lr``, and the cosine only starts
    counting when the warm-up ends. So epoch ``e >= warmup_epochs`` runs at
    ``0.5 * lr * (1 + cos(pi * (e - warmup_epochs) / epochs))``: the first epoch after the warm-up uses the full base
    rate, and since ``T_max`` is all epochs rather than the post-warm-up ones, the cosine never reaches zero. Without a
    warm-up this is the plain cosine over all epochs.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.resolved_epochs))


def global_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches: a seeded permutation cut into ``batch_size`` chunks.

    The last partial batch is dropped when there is at least one full batch (as CoOp's train loader does).
    """
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=g)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def macro_f1(pred: torch.Tensor, target: torch.Tensor, n_cls: int) -> float:
    """Macro-averaged F1 over the classes present in ``target`` or ``pred``."""
    idx = target * n_cls + pred
    conf = torch.bincount(idx, minlength=n_cls * n_cls).reshape(n_cls, n_cls).double()  # (true, pred)
    tp = conf.diag()
    precision_den = conf.sum(0)
    recall_den = conf.sum(1)
    f1 = 2 * tp / (precision_den + recall_den).clamp(min=1)
    present = (precision_den + recall_den) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        if device.type != "cuda":
            raise ValueError("precision 'amp' (fp16 + loss scaling) needs a CUDA device; use 'bf16' on CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def eval_text_features(model: CoOpModel, precision: str = "fp32") -> torch.Tensor | None:
    """The class text features :func:`evaluate` classifies with ``(n_cls, d)``, for a caller evaluating one model on
    several sets (one text pass for all); None for an image-conditioned model, whose prompts depend on each image."""
    if model.conditional:
        return None
    with _autocast(precision, model.prompt_learner.ctx.device):
        return model.text_features()


@torch.no_grad()
def evaluate(model: CoOpModel, data: FeatureSet, precision: str = "fp32", batch_size: int = 4096, *,
             text: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy (%) and macro-F1 (%) from cached features: one text forward, then one matrix product per chunk.

    ``text``: the model's normalised class features ``(n_cls, d)`` when the caller computed them already (a pack
    encodes all its members' classes in one pass); not for an image-conditioned model.
    """
    device = model.prompt_learner.ctx.device
    preds = []
    if text is None:
        text = eval_text_features(model, precision)
    if model.conditional:  # each image has its own prompts (CoCoOp): the model encodes them in bounded chunks
        for chunk in data.features.split(batch_size):
            with _autocast(precision, device):
                logits = model.forward_features(chunk.to(device).float())  # (b, n_cls)
            preds.append(logits.float().argmax(dim=-1).cpu())
    else:
        for chunk in data.features.split(batch_size):
            preds.append(model.logits(chunk.to(device).float(), text.float()).argmax(dim=-1).cpu())
    pred = torch.cat(preds)
    target = data.labels.cpu()
    return {
        "acc": 100.0 * int((pred == target).sum()) / max(len(target), 1),  # exact: 7 of 70 is 10.0, not 10.0000001
        "macro_f1": 100.0 * macro_f1(pred, target, model.prompt_learner.n_cls),
    }


@dataclass
class TrainState:
    """Everything needed to resume: epochs completed, context, optimiser, scheduler, RNG, and what else the model
    learns (``CoOpModel.learned_state``: CoCoOp's meta-net; empty for CoOp)."""

    epoch: int
    ctx: torch.Tensor
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    grad_scaler: dict[str, Any] | None
    rng: torch.Tensor
    learned: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "ctx": self.ctx, "optimizer": self.optimizer, "scheduler": self.scheduler,
            "grad_scaler": self.grad_scaler, "rng": self.rng, "learned": self.learned,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(d["epoch"], d["ctx"], d["optimizer"], d["scheduler"], d.get("grad_scaler"), d["rng"],
                   d.get("learned") or {})


def make_optimizer(
    model: CoOpModel, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD over the context (and CoCoOp's meta-net: the prompt learner, as the references build it with Dassl's
    ``build_optimizer``), and its schedule.

    The scheduler is stepped once per epoch by :func:`train`; it is a ``LambdaLR`` over :func:`lr_at`, so its state
    is just the epoch count, and a run resumed from a :class:`TrainState` continues the schedule exactly.
    """
    # dampening 0 and no Nesterov are Dassl's SGD_DAMPNING / SGD_NESTEROV defaults, which CoOp's configs keep.
    opt = torch.optim.SGD(model.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum, dampening=0.0,
                          nesterov=False, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_at(e, cfg) / cfg.lr)
    return opt, sched


def train(
    model: CoOpModel,
    data: TrainSource,
    cfg: TrainConfig,
    *,
    val: FeatureSet | None = None,
    dist: Distributed | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    resume: TrainState | None = None,
    objective: Objective | None = None,
) -> list[dict[str, float]]:
    """Train the context with CoOp's recipe; the final model is the last epoch's.

    Args:
        model: the CoOp model (its context is updated in place).
        data: training features (cached views or exact on-the-fly encoding).
        cfg: the recipe (lr, schedule, batch size, epochs, precision, seed).
        val: validation features, evaluated every ``cfg.eval_every`` epochs and at the last epoch.
        dist: process group of a multi-worker run; ``SingleProcess`` by default. ``cfg.text_sharding`` says how
            its workers split the text step (``coop_core.distributed.text_sharding_for``).
        report: called with each epoch's metrics (``epoch``, ``train_loss``, ``train_acc``, ``lr``, ``val_acc``...;
            ``epoch_time_s`` is the epoch's training steps, ``val_time_s`` its validation).
        on_epoch_end: called with the resumable state after each epoch (checkpointing).
        resume: continue from this state.
        objective: the method's loss and gradient (``coop_core.methods``); CoOp's cross-entropy by default. Its extra
            terms are reported per epoch as ``train_<term>`` (their mean over the epoch's steps).

    Returns:
        The per-epoch metrics.

    Raises:
        NonFiniteLossError: the loss or the context gradient became NaN or infinite (the run diverged).
    """
    dist = dist or SingleProcess()
    objective = objective or Objective()
    params = model.trainable_parameters()
    device = model.prompt_learner.ctx.device
    epochs = cfg.resolved_epochs
    opt, sched = make_optimizer(model, cfg)
    _autocast(cfg.precision, device)  # validates the precision for this device before any work ('amp' needs CUDA)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" else None
    start = 0
    if resume is not None:
        with torch.no_grad():
            model.prompt_learner.ctx.copy_(resume.ctx.to(device))
        model.load_learned_state({k: v.to(device) for k, v in resume.learned.items()})
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict(resume.scheduler)
        if scaler is not None and resume.grad_scaler:
            scaler.load_state_dict(resume.grad_scaler)
        torch.set_rng_state(resume.rng)
        start = resume.epoch
        logger.info("resuming at epoch %d/%d", start + 1, epochs)
    sharding = text_sharding_for(cfg.text_sharding, model, dist)
    logger.info("text step: %s sharding over %d worker(s)", sharding.name, dist.world_size)
    labels = data.labels
    n = labels.shape[0]
    history = []

    def reduce(grad: torch.Tensor) -> None:
        if dist.world_size > 1:
            dist.all_reduce_sum_(grad)

    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    for p in params:  # every worker all-reduces every gradient, including a step whose shard of images is empty
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        extra_sums: dict[str, float] = {}
        seen = steps = 0
        lr = opt.param_groups[0]["lr"]
        for step, batch in enumerate(global_batches(n, cfg.batch_size, cfg.seed, epoch)):
            shard = batch[dist.rank :: dist.world_size]
            opt.zero_grad(set_to_none=False)
            feats = data.batch(shard, epoch).to(device) if len(shard) else None  # (b_shard, d)
            y = labels[shard].to(device)
            with _autocast(cfg.precision, device):
                if model.conditional:
                    # Each image has its own prompts (CoCoOp), so the text step is per image: data sharding only.
                    text = None
                    logits = model.forward_features(feats) if feats is not None else None  # (b_shard, n_cls)
                else:
                    # Every worker runs the text step, even with no images in its shard: a class-sharded one owes the
                    # others its features (and the gather's backward); the loss of an empty shard is 0.
                    text = sharding.text_features(model)  # (n_cls, d)
                    if feats is None:
                        feats = text.new_zeros(0, text.shape[1])  # (0, d)
                    logits = model.logits(feats, text)  # (b_shard, n_cls)
            if logits is not None:
                terms = objective.terms(model, logits.float(), y, feats, text, len(batch), dist.world_size)
                objective.backward(terms, params, scale, reduce)
                loss_sum += float(terms["ce"].detach()) * len(batch)
                correct += float((logits.argmax(-1) == y).sum())
                for k, v in terms.items():
                    if k != "ce":
                        extra_sums[k] = extra_sums.get(k, 0.0) + float(v.detach())
            else:  # an image-conditioned model's empty shard: no loss, zero gradients, still reduced with the others
                for p in params:
                    reduce(p.grad)
            steps += 1
            # With loss scaling an infinite gradient is the scaler's business (it skips the step and lowers the
            # scale); otherwise a non-finite gradient would poison the context. The summed gradient is the same on
            # every worker, so all of them stop here together.
            if scaler is None:
                for p in params:
                    if not bool(torch.isfinite(p.grad).all()):
                        raise _diverged("loss gradient", p.grad, epoch, step, lr, cfg.precision)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            seen += len(batch)
        sched.step()
        extra_names = sorted(extra_sums)
        stats = torch.stack([loss_sum, correct, *(torch.tensor(extra_sums[k], dtype=torch.float64)
                                                  for k in extra_names)]).to(device)
        if dist.world_size > 1:
            dist.all_reduce_sum_(stats)
        if not bool(torch.isfinite(stats[0])):
            raise _diverged("training loss", stats[0], epoch, None, lr, cfg.precision)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(stats[0]) / max(seen, 1),
            "train_acc": 100.0 * float(stats[1]) / max(seen, 1),
            "lr": lr,
            "epoch_time_s": time.perf_counter() - t0,
        }
        metrics.update({f"train_{k}": float(v) / max(steps, 1) for k, v in zip(extra_names, stats[2:])})
        if val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs):
            t_val = time.perf_counter()
            v = evaluate(model, val, cfg.precision)
            metrics.update(val_acc=v["acc"], val_macro_f1=v["macro_f1"], val_time_s=time.perf_counter() - t_val)
        history.append(metrics)
        logger.info("epoch %d/%d %s", epoch + 1, epochs,
                    " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        if on_epoch_end is not None:
            # deepcopy: opt.state_dict() holds the live momentum buffers, which the next step would overwrite
            state = TrainState(epoch + 1, model.prompt_learner.ctx.detach().cpu().clone(),
                               copy.deepcopy(opt.state_dict()), sched.state_dict(),
                               scaler.state_dict() if scaler is not None else None, torch.get_rng_state(),
                               model.learned_state())
            on_epoch_end(state, metrics)
        if report is not None:
            report(metrics)
    return history
