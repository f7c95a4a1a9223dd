"""How a training step is split over workers: the process-group protocol, and data- versus class-sharded text.

``coop_core.engine.train`` always shards the image batch: worker ``r`` of ``N`` takes ``batch[r::N]`` of every global
batch, divides its summed loss by the global batch size, and the context gradient is summed over workers
(``Distributed.all_reduce_sum_``), so N workers take exactly the one-process step. What a strategy decides is the text
step, CoOp's main cost: every class prompt crosses the whole text tower at every step, whatever the batch size
(``bench/memory.py``: 4.6 GB kept for backward with ImageNet's 1000 classes at ViT-B/16).

- :class:`DataSharding`: every worker encodes all ``n_cls`` prompts. One collective per step, but adding workers does
  not shrink a worker's text compute or activation memory.
- :class:`ClassSharding`: worker ``r`` encodes only its group of classes (:func:`class_shards`) and
  :func:`gather_class_shards` all-gathers the features, so every worker has the logits of its images against all
  classes. In backward, a worker's images give a gradient for every class's feature; the gather sums those over
  workers (an all-reduce of the ``(n_cls, d)`` gradient) and hands each worker the rows of its own classes, which flow
  back through its own prompts only. Each worker's context gradient is then the whole global batch's gradient through
  its classes: with a unified context the usual sum over workers adds up the shards' parts; with a class-specific
  context each worker's gradient is non-zero only in its classes' rows, and the same sum assembles them. Every worker
  still holds the same context and takes the one-process step. Three collectives per step instead of one: the
  gather and its backward move ``n_cls x d`` floats each (2 MB for ImageNet at ViT-B/16), against a text step that
  costs seconds of compute and gigabytes of activations there.

Shards are balanced by cost, not by class count. The text encoder cuts a batch of prompts at its longest end-of-text
position, so a worker pays for every one of its prompts at the length of its longest: with ImageNet's names, equal
contiguous halves put the one 30-token prompt in the first half, and that worker's step took 2.44 GB above its baseline
against the other's 1.85 GB. :func:`balanced_class_shards` orders the classes by prompt length (ties by class index, so
every worker computes the same split) and cuts that order into ``N`` consecutive groups that minimise the largest
estimated cost :func:`text_activation_bytes` ``(n_i, seq_i)``: the slowest, largest worker sets the step's time and the
run's peak memory. Short prompts then share a short encoding: at 1000 ImageNet classes and 2 workers, 699 classes of at
most 21 tokens on one worker and 301 up to 30 tokens on the other, 1.3 GB estimated each against 2.2 GB for the first
contiguous half. A worker's classes are not contiguous, so they are a ``LongTensor`` index
(``PromptLearner.forward(classes=...)``, CSC context rows included) and the gather puts the features back into class
order.

:func:`choose_text_sharding` is the rule behind ``TrainConfig.text_sharding="auto"``; :func:`text_sharding_for` applies
it to a model and a process group. The core never imports a distributed framework: the process group is injected
(``SingleProcess`` here, ``platform.distributed.TorchDistributed`` under Ray Train).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from coop_core.config import TEXT_SHARDINGS

if TYPE_CHECKING:
    from coop_core.model import CoOpModel


class Distributed(Protocol):
    """What the training loop needs from a process group."""

    rank: int
    world_size: int

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over all workers, in place."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every worker's ``tensor`` (the same shape on all), stacked in rank order: ``(world_size, *tensor.shape)``."""
        ...


@dataclass(frozen=True)
class SingleProcess:
    """The trivial process group: one worker."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        return None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)  # (1, *tensor.shape)


def _check_class_count(n_cls: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if n_cls < world_size:
        raise ValueError(f"class sharding needs at least one class per worker, got {n_cls} classes for "
                         f"{world_size} workers; use text_sharding='data'")


def balanced_class_shards(seq_lens: Sequence[int], world_size: int, cost: Callable[[int, int], int]
                          ) -> tuple[torch.Tensor, ...]:
    """Split the classes over ``world_size`` workers so that the costliest worker's text step is as cheap as possible.

    The classes are ordered by prompt length (ties by class index) and the order is cut into ``world_size``
    consecutive, non-empty groups minimising ``max_i cost(n_i, seq_i)``, where ``n_i`` is a group's class count and
    ``seq_i`` its longest prompt: the length the text encoder cuts that worker's prompts at. Consecutive groups of the
    sorted order lose nothing: take any split, rank its groups by their longest prompt and hand them the ``n_1``
    shortest classes, then the next ``n_2``, and so on; every group keeps its size and its longest prompt gets no
    longer (groups 1..i already held ``n_1 + ... + n_i`` classes no longer than ``seq_i``). The smallest feasible
    maximum is found by bisection, each candidate checked greedily (every group takes as many classes as fit, leaving
    one for each later group). Deterministic: the same lengths give the same split on every worker.

    Args:
        seq_lens: each class's prompt length as the text encoder runs it (end-of-text position + 1 when truncating).
        world_size: number of workers.
        cost: ``cost(n, seq)`` in integer units (e.g. :func:`text_activation_bytes` bytes), non-decreasing in both.

    Returns:
        One ascending ``LongTensor`` of class indices per rank; rank 0 has the shortest prompts.

    Raises:
        ValueError: fewer classes than workers (a worker would have nothing to encode).
    """
    n_cls = len(seq_lens)
    _check_class_count(n_cls, world_size)
    order = sorted(range(n_cls), key=lambda c: (seq_lens[c], c))
    seq = [seq_lens[c] for c in order]  # non-decreasing

    def cuts(limit: int) -> list[int] | None:
        """Group ends in ``order`` with every group's cost <= ``limit``, or None when the last group exceeds it."""
        ends, start = [], 0
        for later in range(world_size - 1, 0, -1):  # groups still to come after this one
            end = start + 1  # one class always fits: limit >= cost(1, seq[-1])
            while end < n_cls - later and cost(end + 1 - start, seq[end]) <= limit:
                end += 1
            ends.append(end)
            start = end
        return [*ends, n_cls] if cost(n_cls - start, seq[-1]) <= limit else None

    lo, hi = cost(1, seq[-1]), cost(n_cls, seq[-1])  # no group costs less than its costliest class, or more than all
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    ends = cuts(lo)
    return tuple(torch.tensor(sorted(order[a:b]), dtype=torch.long) for a, b in zip([0, *ends], ends))


def class_shards(model: CoOpModel, world_size: int) -> tuple[torch.Tensor, ...]:
    """:func:`balanced_class_shards` for ``model``'s prompts, costed by :func:`text_activation_bytes`."""
    seq_lens, shared, width, layers = _text_geometry(model)
    return balanced_class_shards(seq_lens, world_size,
                                 lambda n, seq: text_activation_bytes(n, seq, shared, width, layers))


class _GatherClassShards(torch.autograd.Function):
    """All-gather of the class shards' features into class order; backward returns the gradient of this worker's own
    classes, summed over every worker's images."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, shards: tuple[torch.Tensor, ...], dist: Distributed) -> torch.Tensor:
        sizes = [len(s) for s in shards]
        padded = local.new_zeros(max(sizes), local.shape[1])  # (max shard, d): all_gather needs equal shapes
        padded[: len(local)] = local
        gathered = dist.all_gather(padded)  # (world_size, max shard, d)
        out = local.new_empty(sum(sizes), local.shape[1])  # (n_cls, d)
        for rows, classes in zip(gathered, shards):
            out[classes.to(out.device)] = rows[: len(classes)]  # back into class order
        ctx.dist, ctx.classes = dist, shards[dist.rank].to(out.device)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clone()  # (n_cls, d), from this worker's images only; summed in place below
        ctx.dist.all_reduce_sum_(grad)  # every worker's images
        return grad[ctx.classes], None, None  # (shard, d)


def gather_class_shards(local: torch.Tensor, shards: Sequence[torch.Tensor], dist: Distributed) -> torch.Tensor:
    """All classes' features ``(n_cls, d)``, in class order, from each worker's rows ``local`` ``(shard, d)``.

    ``shards[r]`` are worker ``r``'s classes in the order of its rows (:func:`class_shards`), the same on every
    worker; ``local`` holds this worker's. Differentiable: the gradient reaching ``local`` is the sum over all workers
    of their gradients for these rows, so each worker backpropagates the whole global batch through its own prompts.
    Every worker must call it at every step (it runs a collective in forward and one in backward).
    """
    return _GatherClassShards.apply(local, tuple(shards), dist)


@dataclass(frozen=True)
class DataSharding:
    """Every worker encodes every class prompt; only the image batch is split."""

    name: ClassVar[str] = "data"

    def text_features(self, model: CoOpModel) -> torch.Tensor:
        return model.text_features()  # (n_cls, d)


@dataclass(frozen=True)
class ClassSharding:
    """Each worker encodes its own classes ``shards[rank]`` (:func:`class_shards`); the features are all-gathered.

    ``shards`` holds every worker's classes, one index tensor per rank, the same on all workers.
    """

    dist: Distributed
    shards: tuple[torch.Tensor, ...]
    name: ClassVar[str] = "class"

    def __post_init__(self) -> None:
        if len(self.shards) != self.dist.world_size:
            raise ValueError(f"need one class shard per worker, got {len(self.shards)} for {self.dist.world_size}")

    def text_features(self, model: CoOpModel) -> torch.Tensor:
        local = model.text_features(self.shards[self.dist.rank])  # (shard, d)
        return gather_class_shards(local, self.shards, self.dist)  # (n_cls, d), class order


TextSharding = DataSharding | ClassSharding

# Floats autograd keeps per token row, text layer and unit of width in our text encoder (fp32), measured with
# ``saved_tensors_hooks`` at ViT-B/16 and the tiny test config alike: the layer norms' inputs, q/k/v and the attention
# output, the MLP's 4x-wide input and GELU output, and so on.
SAVED_FLOATS_PER_ROW = 10
# With a shared prompt prefix, each class's attention also keeps the keys and values of its whole prompt (the prefix
# ones are copied in per class): 2 more floats per width, per class and prompt position.
SAVED_FLOATS_PER_CLASS_POSITION = 2


def text_activation_bytes(n_cls: int, seq: int, shared_prefix: int, width: int, layers: int) -> int:
    """Estimated bytes one text step over ``n_cls`` prompts keeps for backward (fp32; bf16 autocast roughly halves it).

    ``seq`` is the (truncated) prompt length and ``shared_prefix`` the positions computed once for all classes (0 or 1
    when nothing is shared). The step runs ``p + n_cls * (seq - p)`` token rows with a shared prefix of ``p > 1``
    positions, ``n_cls * seq`` otherwise. Against ``bench/memory.py``'s saved-for-backward bytes less the frozen
    weights they include (ViT-B/16, ImageNet names, seq 30): 449 MB estimated, 451 MB measured at 100 classes with a
    unified context; 4.45 GB (unified) and 7.03 GB (CSC) estimated at 1000 classes, where it reports 4.6 and 7.2 GB
    including 0.14 GB of weights.
    """
    if shared_prefix > 1:
        floats = SAVED_FLOATS_PER_ROW * (shared_prefix + n_cls * (seq - shared_prefix))
        floats += SAVED_FLOATS_PER_CLASS_POSITION * n_cls * seq
    else:
        floats = SAVED_FLOATS_PER_ROW * n_cls * seq
    return 4 * width * layers * floats


def choose_text_sharding(requested: str, *, n_cls: int, world_size: int, text_bytes: int, model_bytes: int) -> str:
    """The text sharding a run uses: ``requested`` unless it is ``"auto"``, then the rule below.

    A worker's peak memory is the model it holds (frozen CLIP, prompt buffers: the same under both strategies) plus
    the step's activations, nearly all of them the text step's (``text_bytes``): with cached features the image batch
    is ``b x d`` floats, and in exact mode the frozen image encoder runs without autograd, freeing each layer's
    activations as it goes, and its batch is split the same way under both strategies. Class sharding divides the text
    step's activations and compute by the number of workers; data sharding does not divide them at all. So "auto"
    picks class sharding when the text step's activations outweigh the model itself (``text_bytes > model_bytes``):
    then they are most of every worker's peak, and sharding them is what lets another worker lower it (and the step
    time, which follows the same token rows). Below that, the saving is a small share of a small step, and data sharding
    keeps a single collective per step. One worker, or fewer classes than workers, always gets data sharding.

    At ViT-B/16 (0.47 GB of frozen parameters, plus 0.12 MB of prompt buffers per class) this switches at 110-150
    classes with a unified context (longer class names switch earlier) and at about 80 with CSC: ImageNet's 1000
    classes are class-sharded, EuroSAT's 10 data-sharded.

    Args:
        requested: ``"auto"``, ``"data"`` or ``"class"`` (``TrainConfig.text_sharding``).
        n_cls: number of classes.
        world_size: number of workers.
        text_bytes: activation memory of one text step over all classes (:func:`text_activation_bytes`).
        model_bytes: memory of the model's parameters and buffers.

    Returns:
        ``"data"`` or ``"class"``.

    Raises:
        ValueError: an unknown ``requested``, or ``"class"`` with fewer classes than workers.
    """
    if requested not in TEXT_SHARDINGS:
        raise ValueError(f"text_sharding must be one of {TEXT_SHARDINGS}, got {requested!r}")
    if requested == "class":
        _check_class_count(n_cls, world_size)
        return "class"
    if requested == "data":
        return "data"
    return "class" if world_size > 1 and n_cls >= world_size and text_bytes > model_bytes else "data"


def _text_geometry(model: CoOpModel) -> tuple[list[int], int, int, int]:
    """What the text step's cost depends on: each class's encoded prompt length, the shared prefix, width, layers."""
    pl, encoder = model.prompt_learner, model.text_encoder
    if encoder.truncate:
        seq_lens, shared = (pl.eot_idx + 1).tolist(), model.shared_prefix
    else:
        seq_lens, shared = [pl.tokenized_prompts.shape[1]] * pl.n_cls, 0
    return seq_lens, shared, encoder.transformer.width, encoder.transformer.layers


def text_sharding_for(requested: str, model: CoOpModel, dist: Distributed) -> TextSharding:
    """The strategy ``coop_core.engine.train`` uses for ``model`` on ``dist`` (``requested`` as in
    :func:`choose_text_sharding`, with the model's own text geometry and memory); ``.name`` says which it is."""
    seq_lens, shared, width, layers = _text_geometry(model)
    text_bytes = text_activation_bytes(len(seq_lens), max(seq_lens), shared, width, layers)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    choice = choose_text_sharding(requested, n_cls=len(seq_lens), world_size=dist.world_size, text_bytes=text_bytes,
                                  model_bytes=model_bytes)
    return ClassSharding(dist, class_shards(model, dist.world_size)) if choice == "class" else DataSharding()
