"""``coop_core.engine.Distributed`` over ``torch.distributed``: the process group Ray Train sets up.

Why no ``DistributedDataParallel`` module wrapper: the only trainable tensor is the prompt context (a few thousand
numbers), and ``coop_core.engine.train`` already does what DDP would do, explicitly. Every worker builds the same
context from the same seed, takes the strided shard ``batch[rank::world_size]`` of the same global batch, computes
``sum(cross_entropy) / len(global batch)`` and asks this object to *sum* the context gradient over workers. The summed
gradient is exactly the one-process gradient of the whole global batch, so N workers take the step one worker would
take. DDP would average instead of sum (needing a rescale), would bucket and hook a single parameter for nothing, and
would have to be told about a frozen CLIP it must not touch. One ``all_reduce`` per step is the whole protocol of
data sharding; class sharding (``coop_core.distributed.ClassSharding``) adds an ``all_gather`` of the text features
and an ``all_reduce`` of their gradient.

The backend is whatever Ray Train initialised: NCCL on GPUs, gloo on CPUs (``TorchConfig`` in ``platform.trainer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class TorchDistributed:
    """A ``coop_core.engine.Distributed`` backed by the default ``torch.distributed`` process group.

    rank / world_size: this worker's rank and the number of workers (Ray Train's world rank and size).
    """

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank}, world_size={self.world_size}")
        if self.world_size > 1 and not torch_dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; run inside a Ray Train TorchTrainer worker")

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over all workers, in place (a no-op for one worker)."""
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every worker's ``tensor`` (the same shape on all), stacked in rank order: ``(world_size, *tensor.shape)``.

        The list form of ``all_gather``, which gloo supports as well as NCCL.
        """
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch_dist.all_gather(out, tensor)
        return torch.stack(out)  # (world_size, *tensor.shape)

    @classmethod
    def from_ray_train(cls) -> TorchDistributed:
        """The current Ray Train worker's process group (call inside ``train_loop_per_worker``)."""
        import ray.train

        ctx = ray.train.get_context()
        return cls(rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
