"""GSPO vs GRPO on stale samples: does the sequence-level ratio tolerate them better?

GSPO (arXiv 2507.18071, §5.4) argues that its length-normalised sequence likelihood tolerates
off-policy samples better than token ratios. Here both algorithms train on the demo task with
asynchronous rollouts of staleness k (``rollout.max_staleness``; k = 0 is the synchronous
baseline), everything else from their seqrl presets (GSPO: clip [3e-4, 4e-4], no KL; GRPO:
clip 0.2, k3 KL β = 0.04). Two ways to train on samples from a policy k versions old:

- ``decoupled`` (default): the three-policy loss. π_prox (the trainer's weights when the step
  begins) is recomputed, the clip acts on π_θ/π_prox, and ω = min(π_prox/μ, 2) corrects for the
  samples' age, per token for GRPO and per length-normalised sequence for GSPO;
- ``coupled`` (``--variants coupled``): ``rollout.old_logprobs_source=sampler``, the stale μ
  itself is π_old, so the clip is centred on the policy that sampled (verl's fully-async GSPO
  reports ``pg_clipfrac`` ≈ 0.4 this way).

Reported per (algorithm, variant, k), mean ± sample std over seeds: final and best held-out
greedy accuracy, the clip fractions (token and, for GSPO, sequence), mean ω and the share of
tokens whose π_prox/μ exceeds the cap, and KL(μ ‖ π_prox) per token (``mismatch/kl``).
Each run is its own process: one trainer thread, plus the rollout worker's one thread for k ≥ 1.

    python benchmarks/staleness.py                                   # 1 seed, 8 runs
    python benchmarks/staleness.py --seeds 0 1 2 --steps 150 --prompts-per-step 32   # the demo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEYS = [  # per-step metrics averaged over the run
    "policy/clip_frac",
    "policy/seq_clip_frac",
    "policy/kl_old",
    "mismatch/kl",
    "mismatch/weight_mean",
    "mismatch/weight_capped_frac",
    "reward/mean",
]


def one_run(args) -> None:
    import torch

    torch.set_num_threads(1)
    from rich.console import Console

    from seqrl.config import load_config
    from seqrl.train.metrics import read_metrics
    from seqrl.train.trainer import Trainer

    overrides = [
        f"preset={args.algo}",
        f"seed={args.seed}",
        f"rollout.max_staleness={args.k}",
        f"rollout.prompts_per_step={args.prompts_per_step}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"task.eval_size={args.eval_size}",
        "train.eval_samples=0",
        "train.checkpoint_every=0",
        "train.log_samples=0",
        "log.tensorboard=false",
        f"output_dir={args.run_root}",
        f"name={args.algo}-{args.variant}-k{args.k}-seed{args.seed}",
    ]
    if args.variant == "coupled":
        overrides.append("rollout.old_logprobs_source=sampler")
    trainer = Trainer(load_config(None, overrides), progress=False, console=Console(quiet=True))
    t0 = time.perf_counter()
    trainer.fit()
    rows = read_metrics(trainer.run_dir)
    steps = [r for r in rows if "time/step_s" in r]
    out = {
        "algo": args.algo,
        "variant": args.variant,
        "k": args.k,
        "seed": args.seed,
        "wall_s": time.perf_counter() - t0,
        "curve": [
            {"step": r["step"], "acc": r["eval/greedy_acc"]} for r in rows if "eval/greedy_acc" in r
        ],
        "means": {
            key: statistics.mean(r[key] for r in steps if key in r)
            for key in KEYS
            if any(key in r for r in steps)
        },
    }
    Path(args.run_out).write_text(json.dumps(out))


def _ms(values: list[float], fmt: str = ".3f") -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def summarise(results: list[dict], out_dir: Path) -> str:
    lines = [
        "| algo | variant | k | final acc | best acc | clip frac | seq clip frac | "
        "mean ω | ρ > C (tokens) | KL(μ‖π_prox)/token | reward |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = sorted(
        {(r["algo"], r["variant"], r["k"]) for r in results},
        key=lambda g: (g[0], g[1] != "decoupled", g[2]),
    )
    for algo, variant, k in groups:
        rs = [r for r in results if (r["algo"], r["variant"], r["k"]) == (algo, variant, k)]

        def col(key, fmt=".3f", rs=rs):
            return _ms([r["means"].get(key, float("nan")) for r in rs], fmt)

        lines.append(
            f"| {algo} | {variant} | {k} | {_ms([r['curve'][-1]['acc'] for r in rs])} "
            f"| {_ms([max(p['acc'] for p in r['curve']) for r in rs])} "
            f"| {col('policy/clip_frac')} | {col('policy/seq_clip_frac')} "
            f"| {col('mismatch/weight_mean')} | {col('mismatch/weight_capped_frac')} "
            f"| {col('mismatch/kl', '.2e')} | {col('reward/mean')} |"
        )
    _plot(results, out_dir / "staleness.png")
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = sorted({r["algo"] for r in results})
    fig, axes = plt.subplots(1, len(algos), figsize=(5 * len(algos), 3.6), sharey=True)
    axes = [axes] if len(algos) == 1 else axes
    ks = sorted({r["k"] for r in results})
    colours = dict(
        zip(ks, ["black", "tab:blue", "tab:orange", "tab:red", "tab:purple"], strict=False)
    )
    for ax, algo in zip(axes, algos, strict=True):
        for r in (x for x in results if x["algo"] == algo):
            label = f"k = {r['k']} ({r['variant']})"
            ax.plot(
                [p["step"] for p in r["curve"]],
                [p["acc"] for p in r["curve"]],
                color=colours[r["k"]],
                linestyle="-" if r["variant"] == "decoupled" else "--",
                marker="o",
                markersize=3,
                alpha=0.8,
                label=label if r["seed"] == min(x["seed"] for x in results) else None,
            )
        ax.set_title(algo)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out greedy accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", nargs="+", default=["gspo", "grpo"])
    p.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4])
    p.add_argument("--variants", nargs="+", default=["decoupled"], choices=["decoupled", "coupled"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/staleness"))
    p.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--algo", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-out", help=argparse.SUPPRESS)
    p.add_argument("--run-root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_run:
        return one_run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for variant in args.variants:
            for k in args.ks:
                if variant == "coupled" and k == 0:
                    continue  # the synchronous run is the same with either
                for algo in args.algos:
                    name = f"{algo}-{variant}-k{k}-seed{seed}"
                    run_out = args.out / f"{name}.json"
                    if not run_out.exists():  # finished runs are kept: the script resumes
                        cmd = [
                            sys.executable, __file__, "--one-run", "--algo", algo,
                            "--variant", variant, "--k", str(k), "--seed", str(seed),
                            "--run-out", str(run_out), "--run-root", str(args.out / "runs"),
                            "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                            "--eval-size", str(args.eval_size),
                            "--prompts-per-step", str(args.prompts_per_step),
                        ]  # fmt: skip
                        env = dict(os.environ, OMP_NUM_THREADS="1")
                        subprocess.run(cmd, check=True, env=env)
                    results.append(json.loads(run_out.read_text()))
                    print(f"{name}: done ({time.perf_counter() - t0:.0f} s total)", flush=True)
    table = summarise(results, args.out)
    walls = ", ".join(f"{r['wall_s']:.0f}" for r in results)
    header = (
        f"command: python benchmarks/staleness.py {' '.join(sys.argv[1:])}\n"
        f"steps {args.steps}, {args.prompts_per_step} prompts × 8 samples per step, held-out "
        f"greedy accuracy every {args.eval_every} steps on {args.eval_size} prompts; "
        f"run wall-clock {walls} s\n"
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)
    print(f"plot: {args.out / 'staleness.png'}")


if __name__ == "__main__":
    main()
