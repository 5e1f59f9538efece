"""FIPO Future-KL: seqrl's exact chunked scan vs the paper's chunked O(L²) matmul.

The paper's method is ``future_kl_quadratic`` in tests/reference.py (a test reference, not part
of the library).

Prints a markdown table of wall time and peak extra memory for B = 8 rows at several lengths,
and checks that both methods agree. Each (method, length) runs in a fresh subprocess so that
its peak resident memory (ru_maxrss) can be read without interference.

    python benchmarks/future_kl.py                 # L ∈ {2048, 8192, 20480, 40960}
    python benchmarks/future_kl.py --lengths 2048 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import seqrl.core as C

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import future_kl_quadratic

METHODS = {"seqrl": C.future_kl, "paper": future_kl_quadratic}


def make_inputs(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-ratios [B, L] of a realistic size (|Δ| ~ 0.05) and a ragged right-padded mask."""
    gen = torch.Generator().manual_seed(seed)
    log_ratio = 0.05 * torch.randn(batch, length, generator=gen)  # [B, L]
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)  # [B]
    mask = torch.arange(length)[None, :] < lengths[:, None]  # [B, L]
    return log_ratio, mask


def measure(method: str, batch: int, length: int, repeats: int) -> dict:
    """Run in the child: peak extra RSS of one call, then the median time of ``repeats`` calls."""
    fn = METHODS[method]
    log_ratio, mask = make_inputs(batch, length)
    kwargs = {"decay_rate": 32.0, "dual_clip_c": 10.0, "chunk_size": 128}
    fn(*make_inputs(batch, 256), **kwargs)  # load kernels before reading the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(log_ratio, mask, **kwargs)  # the measured call is also the warm-up
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(log_ratio, mask, **kwargs)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mib": peak_kib / 1024}


def run_child(method: str, batch: int, length: int, repeats: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--batch",
        str(batch),
        "--lengths",
        str(length),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_agreement(batch: int, length: int) -> float:
    """Max |seqrl − paper| in float64 (exactness check, printed under the table)."""
    log_ratio, mask = make_inputs(batch, length)
    log_ratio = log_ratio.double()
    ours = C.future_kl(log_ratio, mask, decay_rate=32.0, dual_clip_c=10.0)
    paper = future_kl_quadratic(log_ratio, mask, decay_rate=32.0, dual_clip_c=10.0)
    return (ours - paper).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 20480, 40960])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.lengths[0], args.repeats)))
        return

    print(f"# Future-KL, B={args.batch}, float32, decay_rate=32, c=10, chunk 128")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| L | seqrl time (ms) | paper time (ms) | speed-up | seqrl peak (MiB) | paper peak (MiB) | seqrl ns/token |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        ours = run_child("seqrl", args.batch, length, args.repeats)
        paper_repeats = max(1, args.repeats if length <= 8192 else 1)
        paper = run_child("paper", args.batch, length, paper_repeats)
        ns_per_token = 1e9 * ours["seconds"] / (args.batch * length)
        print(
            f"| {length} | {1e3 * ours['seconds']:.2f} | {1e3 * paper['seconds']:.0f} | "
            f"{paper['seconds'] / ours['seconds']:.0f}× | {ours['peak_mib']:.1f} | "
            f"{paper['peak_mib']:.1f} | {ns_per_token:.1f} |",
            flush=True,
        )
    diff = check_agreement(args.batch, min(args.lengths))
    print(f"\nmax |seqrl − paper| in float64 at L={min(args.lengths)}: {diff:.2e}")


if __name__ == "__main__":
    main()
