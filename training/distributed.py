"""DistributedDataParallel plumbing for `torchrun`: read RANK/WORLD_SIZE/LOCAL_RANK, join the process group.

torchrun sets those variables (plus MASTER_ADDR/MASTER_PORT) for every worker; a plain `python` run has none
of them and trains single-process. Only rank 0 writes files or prints the epoch summaries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group was initialised (even a 1-process one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a no-op outside torchrun."""
    if not launched_by_torchrun():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)  # before NCCL init, so each rank owns its own GPU
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, enabled=True)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small CPU tensor of counters over all ranks; returns a CPU tensor (the input itself when single-process).

    The tensor visits the device only for the collective, and only the device the backend needs (NCCL: this rank's
    GPU; gloo: the CPU): float64 counters cannot go to an MPS device at all.
    """
    if info.enabled and info.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        values = values.to(device, copy=True)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.cpu()
    return values


@contextmanager
def local_main_first(info: DistInfo) -> Iterator[None]:
    """Run the body on each node's local rank 0 first, then on that node's other ranks.

    For downloads into a shared folder (Pets archives, torch hub weights): eight ranks fetching the same archive
    at once would write one file eight times over. Every rank passes exactly one barrier; if local rank 0 fails,
    torchrun stops the waiting ranks.
    """
    if info.enabled and info.local_rank != 0:
        barrier(info)
    yield
    if info.enabled and info.local_rank == 0:
        barrier(info)
