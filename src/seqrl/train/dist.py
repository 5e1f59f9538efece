"""Everything that depends on the process's rank lives here.

Single-process runs (the default) see rank 0 of world size 1 and every helper is a no-op;
under ``torchrun`` the same calls shard prompts by rank (whole groups, so group statistics stay
exact), sum gradients and loss normalisers over ranks, reduce metrics, and let only rank 0 write
files.

Data parallelism here is exact rather than approximate: every rank holds a full replica, the
loss of a micro-batch is its local token (or sequence) sum divided by the normaliser of the
*global* minibatch (all ranks), and gradients are summed over ranks once per optimiser step.
The parameters after a step therefore equal those of one process that saw the whole batch, up
to float rounding (tests/train/test_distributed.py checks this with two gloo processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqrl.train.metrics import MetricAccumulator, extreme_kind


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()
"""One process: rank 0 of 1 (the default everywhere a DistInfo is optional)."""


def init_from_env() -> DistInfo:
    """Read RANK/WORLD_SIZE set by torchrun; initialise the process group when world_size > 1.

    The backend is nccl when CUDA is available, gloo otherwise (``SEQRL_DIST_BACKEND``
    overrides it, e.g. gloo on a GPU machine for debugging).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        default = "nccl" if torch.cuda.is_available() else "gloo"
        backend = os.environ.get("SEQRL_DIST_BACKEND", default)
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def cleanup() -> None:
    """Tear down the process group (end of a ``torchrun`` job); no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shard_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous share of ``n`` items; ``n`` must split evenly."""
    if n % info.world_size:
        raise ValueError(
            f"{n} prompts cannot be split evenly over {info.world_size} ranks: make "
            f"rollout.prompts_per_step a multiple of the number of processes"
        )
    per_rank = n // info.world_size
    return info.rank * per_rank, (info.rank + 1) * per_rank


def shard(items: list, info: DistInfo) -> list:
    """This rank's contiguous share of ``items`` (prompts; groups are formed after sharding)."""
    lo, hi = shard_bounds(len(items), info)
    return items[lo:hi]


def uneven_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous share of ``n`` items (shares differ by at most one)."""
    base, extra = divmod(n, info.world_size)
    lo = info.rank * base + min(info.rank, extra)
    return lo, lo + base + (info.rank < extra)


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Σ over ranks (identity on one process); a new tensor, ``t`` is left unchanged."""
    if info.active:
        device = t.device
        t = t.to(_comm_device(), copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.to(device)
    return t


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum ``.grad`` over ranks in place, in one flat buffer (a rank without a gradient sends 0).

    The micro-batch losses are already divided by the global normaliser, so the sum, not the
    mean, is the gradient of the global minibatch loss. A parameter no rank has a gradient for
    keeps ``grad=None`` (the optimiser then skips it, as it would in one process).
    """
    if not info.active or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad.to(grads[0].dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype, copy=True)
        offset += n
    for p, count in zip(params, flat[offset:].tolist(), strict=True):
        if count == 0:  # no rank produced a gradient: leave it None, as one process would
            p.grad = None


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if ``flag`` is True on any rank."""
    if not info.active:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)]), info).item() > 0)


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (replicas start identical).

    A tensor off the collective's device (a CPU model under nccl, before FSDP shards it) goes
    through a copy on that device.
    """
    if not info.active:
        return
    comm = _comm_device()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device == comm:
                dist.broadcast(t.data, src=0)
            else:
                on_comm = t.data.to(comm)
                dist.broadcast(on_comm, src=0)
                t.data.copy_(on_comm)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (a picklable Python object)."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_cat(t: Tensor, info: DistInfo) -> Tensor:
    """Concatenate each rank's 1-d (or row-stacked) tensor in rank order; sizes may differ."""
    if not info.active:
        return t
    parts = [None] * info.world_size
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


def gather_list(items: list, info: DistInfo) -> list:
    """Concatenate each rank's Python list in rank order."""
    if not info.active:
        return items
    parts = [None] * info.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def reduce_sums(sums: dict[str, tuple[float, int]], info: DistInfo) -> dict[str, float]:
    """{key: (sum, count)} per rank → {key: Σ sum / Σ count} over ranks (keys may differ by rank).

    Extremes (``*_max`` / ``*_min``) carry the value itself and reduce by max / min.
    """
    if info.active:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, sums)
        total: dict[str, list] = {}
        for part in parts:
            for key, (s, c) in part.items():
                if key not in total:
                    total[key] = [s, c]
                elif (kind := extreme_kind(key)) is not None:
                    total[key] = [
                        max(total[key][0], s) if kind == "max" else min(total[key][0], s),
                        1,
                    ]
                else:
                    total[key][0] += s
                    total[key][1] += c
        sums = {k: (v[0], v[1]) for k, v in total.items()}
    return {k: s if extreme_kind(k) else s / c for k, (s, c) in sorted(sums.items()) if c}


def reduce_metrics(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each metric over the ranks that report it (identity on one process)."""
    if not info.active:
        return metrics
    return reduce_sums({k: (v, 1) for k, v in metrics.items()}, info)


def mean_metrics(acc: MetricAccumulator, info: DistInfo) -> dict[str, float]:
    """An accumulator's per-key means, over every rank's micro-batches (extremes: the extreme)."""
    return reduce_sums(acc.sums(), info) if info.active else acc.means()
