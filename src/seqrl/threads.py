"""CPU threads for torch: how many cores this process may use, and how many threads seqrl runs.

torch's own default is the number of physical cores of the machine. That ignores the CPU
affinity mask (``taskset``, a batch scheduler's allocation) and a container's CPU quota, and
on a machine where other processes are busy, OpenMP threads that spin-wait for each other can
make a step many times slower than one thread would. seqrl therefore picks its own default:

    threads = OMP_NUM_THREADS when it is set, else min(available cores, MAX_DEFAULT_THREADS)

where the available cores are the affinity mask, capped by a cgroup CPU quota. Every ``seqrl``
command takes ``--threads N`` (``seqrl train``: also the ``threads`` config key) and prints the
number it uses at start-up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_DEFAULT_THREADS = 8
"""The default's cap: the small models seqrl trains on a CPU gain little from more threads."""

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def _cgroup_quota() -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up); None when unlimited."""
    try:
        if _CGROUP_V2.is_file():
            quota, period = _CGROUP_V2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        if _CGROUP_V1[0].is_file():
            quota = int(_CGROUP_V1[0].read_text())
            period = int(_CGROUP_V1[1].read_text())
            return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None
    return None


def available_cores() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def default_threads() -> tuple[int, str]:
    """(threads, why): ``OMP_NUM_THREADS`` when set, else the available cores up to the cap."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "from OMP_NUM_THREADS"
    cores = available_cores()
    if cores > MAX_DEFAULT_THREADS:
        return MAX_DEFAULT_THREADS, f"{cores} cores available, capped at {MAX_DEFAULT_THREADS}"
    return cores, f"all {cores} available core{'s' if cores > 1 else ''}"


def set_threads(threads: int | None = None) -> tuple[int, str]:
    """Make torch use ``threads`` intra-op threads (None: :func:`default_threads`).

    Returns (threads, a short reason) for the start-up line; raises ValueError for ``threads < 1``.
    """
    import torch

    if threads is None:
        threads, why = default_threads()
    elif threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    else:
        why = f"set; {available_cores()} cores available"
    torch.set_num_threads(threads)
    return threads, why


def threads_line(threads: int, why: str) -> str:
    """The start-up line every command prints, e.g. ``threads: 2 (all 2 available cores)``."""
    return f"threads: {threads} ({why}; --threads N changes it)"
