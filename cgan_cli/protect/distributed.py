"""torchrun support: one process per GPU (or CPU slot), each protecting a disjoint share of the shards.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. We init torch.distributed with nccl on CUDA and gloo
on CPU, give rank r the shards [r::world] (round-robin: neighbouring shards, often similar in size,
land on different ranks), and let rank 0 merge the per-rank summaries that `all_gather_object`
collects. Without torchrun everything here degrades to a single rank and no process group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"  # what the engine gets: --device as given, or cuda:LOCAL_RANK / cpu under torchrun
    active: bool = False  # True when a process group was initialised (and must be torn down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group when launched by torchrun; otherwise a single-rank context.

    `device` is the user's --device. Without torchrun it is passed on untouched. Under torchrun,
    auto / cuda / cuda:N with a GPU present mean cuda:LOCAL_RANK (each rank its own GPU, nccl);
    anything else (or no GPU) keeps every rank on CPU with gloo.
    """
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, f"cuda:{local_rank}" if use_cuda else "cpu", active=True)


def rank_share(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's disjoint share; the union over ranks is every item exactly once."""
    return list(items[ctx.rank :: ctx.world_size])


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank); [obj] when not distributed."""
    if not ctx.active:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
