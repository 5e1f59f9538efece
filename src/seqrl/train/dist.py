"""Everything that depends on the process's rank lives here.

Single-process runs (the default) see rank 0 of world size 1 and every helper is a no-op;
under ``torchrun`` the same calls shard prompts by rank (whole groups, so group statistics stay
exact), reduce metrics across ranks, and let only rank 0 write files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Read RANK/WORLD_SIZE set by torchrun; initialise the process group when world_size > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def shard(items: list, info: DistInfo) -> list:
    """This rank's contiguous share of ``items`` (prompts; groups are formed after sharding)."""
    if len(items) % info.world_size:
        raise ValueError(
            f"{len(items)} prompts cannot be split evenly over {info.world_size} ranks"
        )
    per_rank = len(items) // info.world_size
    return items[info.rank * per_rank : (info.rank + 1) * per_rank]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Σ over ranks (identity on one process)."""
    if info.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_metrics(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each metric over ranks (identity on one process)."""
    if info.world_size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    values = all_reduce_sum(values, info) / info.world_size
    return dict(zip(keys, values.tolist(), strict=True))
