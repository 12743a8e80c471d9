"""Multi-process training on PyTorch's own engine (torch.distributed + DistributedDataParallel).

`torchrun --nproc-per-node N -m adaclip fit ...` starts N processes; each reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment (multi-node: the usual torchrun rendezvous flags). adaclip then

* joins the process group (NCCL on CUDA, gloo on CPU),
* splits every *global* batch of the single-process run across the ranks, so N processes with batch
  size B/N take exactly the optimisation steps one process takes with batch size B,
* averages gradients with DistributedDataParallel and sums metrics across ranks,
* writes files and prints results on rank 0 only.

A single process is the same code with world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


def context_from_env() -> DistContext:
    """The torchrun environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistContext(
        rank=int(os.environ.get("RANK", "0")),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(ctx: DistContext, device: torch.device) -> None:
    """Join the process group once (no-op for a single process)."""
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world)


def device_for_rank(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per local rank; CPU ranks share the CPU."""
    if ctx.enabled and device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def shard_of_batch(indices: torch.Tensor, ctx: DistContext, batch_size: int) -> torch.Tensor:
    """This rank's contiguous slice of one global batch (ranks get equal slices when B % N == 0)."""
    if not ctx.enabled:
        return indices
    if batch_size % ctx.world:
        raise UsageError(
            f"batch size {batch_size} is not divisible by the {ctx.world} processes",
            fix=f"use a batch size that is a multiple of {ctx.world}",
        )
    per_rank = -(-len(indices) // ctx.world)
    return indices[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
