"""Data-parallel meta-training: each process takes a slice of every meta-batch.

Started by ``torchrun``, every rank draws the same episode indices (same seed)
and gathers only its own tasks, computes their meta-gradient, and the
gradients are averaged with one all-reduce, so N processes take exactly the
step one process would take on the whole meta-batch. Rank 0 alone logs,
checkpoints and evaluates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metarun.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def init_distributed(device: torch.device) -> tuple[Topology, torch.device]:
    """Joins the process group torchrun set up (NCCL on GPUs, gloo on CPU); one process is world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Topology(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Topology(rank, world, local_rank), device


def check_divisible(meta_batch: int, world: int) -> None:
    if meta_batch % world:
        raise ConfigError(f"task.meta_batch={meta_batch} does not split over {world} processes: make it a multiple of {world}")


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """One flat all-reduce of every gradient, divided by the number of processes."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
