"""How a training step is split over workers: the process-group protocol, and data- versus class-sharded text.

``coop_core.engine.train`` always shards the image batch: worker ``r`` of ``N`` takes ``batch[r::N]`` of every global
batch, divides its summed loss by the global batch size, and the context gradient is summed over workers
(``Distributed.all_reduce_sum_``), so N workers take exactly the one-process step. What a strategy decides is the text
step, CoOp's main cost: every class prompt crosses the whole text tower at every step, whatever the batch size
(``bench/memory.py``: 4.6 GB kept for backward with ImageNet's 1000 classes at ViT-B/16).

- :class:`DataSharding`: every worker encodes all ``n_cls`` prompts. One collective per step, but adding workers does
  not shrink a worker's text compute or activation memory.
- :class:`ClassSharding`: worker ``r`` encodes only its contiguous range :func:`class_shard` of the classes and
  :func:`gather_class_shards` all-gathers the features, so every worker has the logits of its images against all
  classes. In backward, a worker's images give a gradient for every class's feature; the gather sums those over
  workers (an all-reduce of the ``(n_cls, d)`` gradient) and hands each worker the rows of its own shard, which flow
  back through its own prompts only. Each worker's context gradient is then the whole global batch's gradient through
  its classes: with a unified context the usual sum over workers adds up the shards' parts; with a class-specific
  context each worker's gradient is non-zero only in its classes' rows, and the same sum assembles them. Every worker
  still holds the same context and takes the one-process step. Three collectives per step instead of one: the
  gather and its backward move ``n_cls x d`` floats each (2 MB for ImageNet at ViT-B/16), against a text step that
  costs seconds of compute and gigabytes of activations there.

Shards are contiguous rather than strided so that a worker's prompts, its class-specific context rows and its prompt
buffers are slices, and the gathered features come out in class order without a permutation.

:func:`choose_text_sharding` is the rule behind ``TrainConfig.text_sharding="auto"``; :func:`text_sharding_for` applies
it to a model and a process group. The core never imports a distributed framework: the process group is injected
(``SingleProcess`` here, ``platform.distributed.TorchDistributed`` under Ray Train).
"""

from __future__ import annotations

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


def class_shard(n_cls: int, rank: int, world_size: int) -> slice:
    """The contiguous range of classes worker ``rank`` encodes: ``n_cls // world_size`` of them, one more for the
    first ``n_cls % world_size`` workers (``torch.tensor_split``'s split).

    Raises:
        ValueError: fewer classes than workers (a worker would have nothing to encode), or a rank out of range.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if n_cls < world_size:
        raise ValueError(f"class sharding needs at least one class per worker, got {n_cls} classes for "
                         f"{world_size} workers; use text_sharding='data'")
    size, extra = divmod(n_cls, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


class _GatherClassShards(torch.autograd.Function):
    """All-gather of the class shards' features; backward returns the gradient of this worker's own shard, summed
    over every worker's images."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, n_cls: int, dist: Distributed) -> torch.Tensor:
        shards = [class_shard(n_cls, r, dist.world_size) for r in range(dist.world_size)]
        sizes = [s.stop - s.start for s in shards]
        padded = local.new_zeros(max(sizes), local.shape[1])  # (max shard, d): all_gather needs equal shapes
        padded[: len(local)] = local
        gathered = dist.all_gather(padded)  # (world_size, max shard, d)
        ctx.dist, ctx.shard = dist, shards[dist.rank]
        return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])  # (n_cls, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clone()  # (n_cls, d), from this worker's images only; summed in place below
        ctx.dist.all_reduce_sum_(grad)  # every worker's images
        return grad[ctx.shard], None, None  # (shard, d)


def gather_class_shards(local: torch.Tensor, n_cls: int, dist: Distributed) -> torch.Tensor:
    """All classes' features ``(n_cls, d)`` from each worker's :func:`class_shard` rows ``local`` ``(shard, d)``.

    Differentiable: the gradient reaching ``local`` is the sum over all workers of their gradients for these rows, so
    each worker backpropagates the whole global batch through its own prompts. Every worker must call it at every step
    (it runs a collective in forward and one in backward).
    """
    return _GatherClassShards.apply(local, n_cls, dist)


@dataclass(frozen=True)
class DataSharding:
    """Every worker encodes every class prompt; only the image batch is split."""

    name: ClassVar[str] = "data"

    def text_features(self, model: CoOpModel) -> torch.Tensor:
        return model.text_features()  # (n_cls, d)


@dataclass(frozen=True)
class ClassSharding:
    """Each worker encodes its :func:`class_shard` of the class prompts; the features are all-gathered."""

    dist: Distributed
    name: ClassVar[str] = "class"

    def text_features(self, model: CoOpModel) -> torch.Tensor:
        n_cls = model.prompt_learner.n_cls
        local = model.text_features(class_shard(n_cls, self.dist.rank, self.dist.world_size))  # (shard, d)
        return gather_class_shards(local, n_cls, self.dist)  # (n_cls, d)


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
        class_shard(n_cls, 0, world_size)  # raises when a worker would get no class
        return "class"
    if requested == "data":
        return "data"
    return "class" if world_size > 1 and n_cls >= world_size and text_bytes > model_bytes else "data"


def text_sharding_for(requested: str, model: CoOpModel, dist: Distributed) -> TextSharding:
    """The strategy ``coop_core.engine.train`` uses for ``model`` on ``dist`` (``requested`` as in
    :func:`choose_text_sharding`, with the model's own text geometry and memory); ``.name`` says which it is."""
    pl, encoder = model.prompt_learner, model.text_encoder
    seq = int(pl.eot_idx.max()) + 1 if encoder.truncate else pl.tokenized_prompts.shape[1]
    text_bytes = text_activation_bytes(pl.n_cls, seq, model.shared_prefix if encoder.truncate else 0,
                                       encoder.transformer.width, encoder.transformer.layers)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    choice = choose_text_sharding(requested, n_cls=pl.n_cls, world_size=dist.world_size, text_bytes=text_bytes,
                                  model_bytes=model_bytes)
    return ClassSharding(dist) if choice == "class" else DataSharding()
