"""Process-group plumbing for torchrun: one process per device, gloo on CPU, nccl on GPU.

Without torchrun (no ``WORLD_SIZE`` > 1 and no initialised group) everything runs in-process with
``world == 1`` and the reductions are identities.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when a GPU is available, else the CPU."""
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """This process's rank, the number of processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=default_device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> Tensor:
        """This rank's sample indices out of ``n``: ``rank, rank + world, ...`` (no padding, so
        counts summed over ranks equal a single process's counts)."""
        return torch.arange(self.rank, n, self.world)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Element-wise sum over all ranks (a copy on this rank's device; ``t`` itself if alone)."""
        if self.world == 1:
            return t
        out = t.detach().to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (DDP leaves each rank's last BatchNorm statistics)."""
        if self.world == 1:
            return
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextlib.contextmanager
def distributed_context() -> Iterator[DistContext]:
    """The context of this process; joins torchrun's group (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)
    when there is one, using an already initialised group as is, and leaves what it created."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield DistContext(device=device)
        return
    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(BACKENDS[device.type])
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()
