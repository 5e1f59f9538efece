"""Synchronous vs asynchronous rollouts on the demo (GSPO, builtin:tiny-addition-noisy).

Arms, each (arm, seed) in its own process, one after the other, seeds interleaved:
- ``sync``: today's loop in one process with two torch threads (sample, then update);
- ``async-k1``, ``async-k2``: ``rollout.max_staleness`` = 1 or 2: the trainer with one thread
  and the rollout worker process with one thread, sampling up to k steps ahead;
- ``sync-1thread`` (``--arms``): today's loop with one thread, to tell how much of a speed-up
  comes from the second core at all;
- ``async-k1-2threads`` (``--arms``): k = 1 with two trainer threads beside the one-thread
  worker (the cores are oversubscribed only while the worker samples).

Everything else is the demo's config (``seqrl train`` with no argument): 32 prompts × 8
samples per step, 4 minibatches, lr 2e-5; held-out greedy accuracy on ``--eval-size`` prompts
every ``--eval-every`` steps. Reported per arm, mean ± sample std over seeds:
- steps per second of training (steps / Σ ``time/step_s``; evaluation excluded) and of the whole
  run (steps / wall-clock of ``fit``, with start-up and evaluation), and the speed-up over sync;
- held-out greedy accuracy at equal wall-clock: at the moment the fastest arm finished (its mean
  end time), read off each run's accuracy-vs-wall-clock curve (linear between evaluations);
- final accuracy (equal steps), and the waits: the trainer for samples, the worker for weights.

This is a throughput benchmark: on a machine shared with other work the ratio means little
(the script records the load average before and after). Plot: accuracy vs wall-clock.

    python benchmarks/async_vs_sync.py                          # 3 seeds × 150 steps × 3 arms
    python benchmarks/async_vs_sync.py --steps 20 --seeds 0 --eval-every 10   # a quick check
    python benchmarks/async_vs_sync.py --arms sync async-k1 --judge-wait-ms 2  # a waiting verifier
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# arm → (rollout.max_staleness, torch threads of the trainer); the worker always has one thread
ARMS = {
    "sync": (0, 2),
    "async-k1": (1, 1),
    "async-k2": (2, 1),
    "sync-1thread": (0, 1),
    "async-k1-2threads": (1, 2),
}
DEFAULT_ARMS = ["sync", "async-k1", "async-k2"]


JUDGE_ENV = "ASYNC_BENCH_JUDGE_WAIT_MS"


def waiting_judge(completion: str, example) -> float:
    """A reward term that only waits (``--judge-wait-ms`` per response) and scores 0: the latency
    of a verifier that is not this machine's compute (a remote judge, a sandbox service)."""
    time.sleep(float(os.environ.get(JUDGE_ENV, "0")) / 1000)
    return 0.0


def one_run(args) -> None:
    """One (arm, seed) in this process: train, and write its curve and timings as JSON."""
    import torch

    k, threads = ARMS[args.arm]
    torch.set_num_threads(threads)
    from rich.console import Console

    from seqrl.config import load_config
    from seqrl.train.metrics import read_metrics
    from seqrl.train.trainer import Trainer

    class Timed(Trainer):
        """Stamps every evaluation with the wall-clock since ``fit`` began."""

        def fit(self):
            self.fit_start = time.perf_counter()
            return super().fit()

        def evaluate(self):
            start = time.perf_counter() - self.fit_start
            return super().evaluate() | {"bench/wall_s": start}

    cfg = load_config(
        None,
        [
            f"seed={args.seed}",
            f"rollout.max_staleness={k}",
            f"train.steps={args.steps}",
            f"train.eval_every={args.eval_every}",
            f"task.eval_size={args.eval_size}",
            "train.eval_samples=0",
            "train.checkpoint_every=0",
            "train.log_samples=0",
            "log.tensorboard=false",
            f"output_dir={args.run_root}",
            f"name={args.arm}-seed{args.seed}",
            *args.set,
        ],
    )
    load_before = os.getloadavg()
    trainer = Timed(cfg, progress=False, console=Console(quiet=True))
    t0 = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - t0
    rows = read_metrics(trainer.run_dir)
    steps = [r for r in rows if "time/step_s" in r]

    def mean(key):
        values = [r[key] for r in steps if key in r]
        return statistics.mean(values) if values else float("nan")

    out = {
        "arm": args.arm,
        "seed": args.seed,
        "curve": [
            {"step": r["step"], "wall_s": r["bench/wall_s"], "acc": r["eval/greedy_acc"]}
            for r in rows
            if "bench/wall_s" in r
        ],
        "train_steps_per_s": len(steps) / sum(r["time/step_s"] for r in steps),
        "total_steps_per_s": len(steps) / total,
        "total_s": total,
        "trainer_wait_s": mean("async/trainer_wait_s"),
        "worker_wait_s": mean("async/worker_wait_s"),
        "clip_frac": mean("policy/clip_frac"),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    Path(args.run_out).write_text(json.dumps(out))


def accuracy_at(curve: list[dict], t: float) -> float:
    """Held-out accuracy at wall-clock ``t``: linear between evaluations, flat after the last."""
    points = [(p["wall_s"], p["acc"]) for p in curve]
    if t <= points[0][0]:
        return points[0][1]
    for (t0, a0), (t1, a1) in itertools.pairwise(points):
        if t <= t1:
            return a0 + (a1 - a0) * (t - t0) / (t1 - t0)
    return points[-1][1]


def _ms(values: list[float], fmt: str = ".3f") -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def summarise(results: list[dict], out_dir: Path) -> str:
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    by_arm = {a: [r for r in results if r["arm"] == a] for a in arms}
    end = {a: statistics.mean(r["curve"][-1]["wall_s"] for r in by_arm[a]) for a in arms}
    t_equal = min(end.values())
    sync = by_arm.get("sync")
    sync_rate = statistics.mean(r["train_steps_per_s"] for r in sync) if sync else None
    lines = [
        f"equal wall-clock point: {t_equal:.0f} s (the fastest arm's mean time to its last "
        "evaluation)",
        "",
        "| arm | torch threads | steps/s (training) | speed-up | steps/s (whole run) | "
        f"acc at {t_equal:.0f} s | final acc | trainer waits (s/step) | worker waits (s/step) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        rs = by_arm[a]
        k, threads = ARMS[a]
        threads = f"{threads}" if k == 0 else f"{threads} + 1 (worker)"
        rates = [r["train_steps_per_s"] for r in rs]
        speed = f"{statistics.mean(rates) / sync_rate:.2f}×" if sync_rate else "–"
        lines.append(
            f"| {a} | {threads} | {_ms(rates)} | {speed} "
            f"| {_ms([r['total_steps_per_s'] for r in rs])} "
            f"| {_ms([accuracy_at(r['curve'], t_equal) for r in rs])} "
            f"| {_ms([r['curve'][-1]['acc'] for r in rs])} "
            f"| {_ms([r['trainer_wait_s'] for r in rs])} | {_ms([r['worker_wait_s'] for r in rs])} |"
        )
    _plot(by_arm, out_dir / "async_vs_sync.png")
    return "\n".join(lines)


def _plot(by_arm: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "sync": "tab:grey",
        "async-k1": "tab:blue",
        "async-k2": "tab:orange",
        "sync-1thread": "tab:green",
        "async-k1-2threads": "tab:purple",
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, rs in by_arm.items():
        for i, r in enumerate(rs):
            ax.plot(
                [p["wall_s"] for p in r["curve"]],
                [p["acc"] for p in r["curve"]],
                color=colours[arm],
                marker="o",
                markersize=3,
                alpha=0.7,
                label=arm if i == 0 else None,
            )
    ax.set_xlabel("wall-clock since the run started (s)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/async_vs_sync"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every arm (repeatable), e.g. rollout.max_new_tokens=96",
    )
    p.add_argument(
        "--judge-wait-ms",
        type=float,
        default=0.0,
        help="add a reward term that waits this long per response and scores 0 (a verifier's "
        "latency that uses no CPU)",
    )
    p.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-out", help=argparse.SUPPRESS)
    p.add_argument("--run-root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_run:
        return one_run(args)
    if args.judge_wait_ms > 0:
        os.environ[JUDGE_ENV] = str(args.judge_wait_ms)  # the runs inherit it
        args.set.append("reward.terms=[{fn: 'async_vs_sync:waiting_judge', weight: 1.0}]")
    args.out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for arm in args.arms:
            run_out = args.out / f"{arm}-seed{seed}.json"
            cmd = [
                sys.executable, __file__, "--one-run", "--arm", arm, "--seed", str(seed),
                "--run-out", str(run_out), "--run-root", str(args.out / "runs"),
                "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                "--eval-size", str(args.eval_size),
                *(x for o in args.set for x in ("--set", o)),
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS=str(ARMS[arm][1]))
            subprocess.run(cmd, check=True, env=env)
            results.append(json.loads(run_out.read_text()))
            print(f"{arm} seed {seed}: done ({time.perf_counter() - t0:.0f} s total)", flush=True)
    table = summarise(results, args.out)
    loads = [x for r in results for x in (r["load_before"][0], r["load_after"][0])]
    header = (
        f"{os.cpu_count()} CPUs; 1-minute load average during the runs "
        f"{min(loads):.1f}–{max(loads):.1f}; total {time.perf_counter() - t0:.0f} s\n"
        f"command: python benchmarks/async_vs_sync.py {' '.join(sys.argv[1:])}\n"
        f"steps {args.steps}, eval every {args.eval_every} steps on {args.eval_size} prompts\n"
        + (f"overrides: {' '.join(args.set)}\n" if args.set else "")
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)
    print(f"plot: {args.out / 'async_vs_sync.png'}")


if __name__ == "__main__":
    main()
