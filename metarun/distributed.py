"""Data-parallel meta-training: each process takes a slice of every meta-batch.

Started by ``torchrun``, every rank draws the same episode indices (same seed)
and gathers only its own tasks, computes their meta-gradient, and the
gradients are averaged with one all-reduce, so N processes take exactly the
step one process would take on the whole meta-batch. Rank 0 alone logs,
checkpoints and evaluates.
"""

from __future__ import annotations

import importlib
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
        # torch._dynamo (which the first optimizer imports) keeps a process group that exists when it is
        # imported alive after destroy_process_group; at exit gloo's threads then free work that holds
        # Python tensors while the interpreter shuts down, and the process aborts now and then
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Topology(rank, world, local_rank), device


def check_divisible(meta_batch: int, world: int) -> None:
    if meta_batch % world:
        raise ConfigError(f"task.meta_batch={meta_batch} does not split over {world} processes: make it a multiple of {world}")


def average_gradients(params: list[torch.nn.Parameter], world: int, buffers: list[torch.Tensor] = ()) -> None:
    """Every gradient, and ``buffers``, averaged over the processes in one all-reduce.

    The buffers are batch norm's running statistics (and Reptile's carried
    Adam moments): each rank moved them towards the mean over its own tasks,
    and as that update is linear in those, their mean over ranks is what one
    process computes from the whole meta-batch.
    """
    average([p.grad for p in params if p.grad is not None] + list(buffers), world)


def average(tensors: list[torch.Tensor], world: int) -> None:
    """In place, each tensor's mean over the processes: one flat all-reduce."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def on_every_rank(flag: torch.Tensor, world: int) -> torch.Tensor:
    """``flag`` and-ed over the processes, for decisions they must take together (skipping a step)."""
    return _reduce(flag.to(torch.int32), world, "MIN").bool() if world > 1 else flag


def largest(value: torch.Tensor, world: int) -> torch.Tensor:
    """An integer's maximum over the processes (a stop signal that reached only some of them)."""
    return _reduce(value, world, "MAX")


def _reduce(value: torch.Tensor, world: int, op: str) -> torch.Tensor:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value


def from_main(value: str, world: int) -> str:
    """Rank 0's ``value`` on every rank (e.g. the run folder, which Hydra names by the time each process started)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Leaves the process group once every rank is ready to: a rank that tore its connections down while
    another was still writing checkpoints could abort at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
