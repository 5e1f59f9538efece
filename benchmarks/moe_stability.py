"""GSPO §5.3 on a tiny MoE: GRPO without Routing Replay, GRPO with it, GSPO without it; 3 seeds.

The paper's claim: on MoE policies the experts a token activates move after every update, so
token-level importance ratios (GRPO) compare different sub-networks and training needs Routing
Replay, while GSPO's length-normalised sequence ratio stays stable without it.

All arms start from the shipped ``builtin:tiny-moe-addition-noisy`` (a Qwen3-MoE, 4 blocks of 8
experts, top-2, supervised warm start on 3-digit addition) and share the task, data order,
seeds, group size, learning rate, minibatches per rollout (default 8, so 7 of 8 updates are
off-policy) and no KL term. They differ only in the loss (``grpo``: token ratio clipped to
[0.8, 1.27], the GSPO paper's tuned range for its GRPO baseline, §5.1; ``gspo``: sequence ratio
clipped to [3e-4, 4e-4]) and ``moe.routing_replay``.

Reported per arm (mean ± sd over seeds): held-out greedy accuracy at start and end, training
accuracy, ``moe/routing_churn`` (share of (response token, layer) pairs whose top-k set under
π_θ differs from π_old, pooled over the updates after the first of each rollout; under replay
it is the router's *own* choice that is compared, the experts used are the recorded ones),
``moe/expert_change`` (|E_new \\ E_old| / k), clip fractions, KL to π_old, expert-load CV.

    python benchmarks/moe_stability.py                      # 20 steps × 9 runs, a few minutes
    python benchmarks/moe_stability.py --steps 60 --lr 1e-4 # longer, larger steps
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import markdown_table, run_arms
from seqrl.train.metrics import metric_series

# GRPO as the GSPO paper's baseline (§5.1): clip [0.2, 0.27] (its tuned range), no KL term
GRPO = ["algo.name=grpo", "algo.loss.clip_high=0.27"]
ARMS = {
    "GRPO": [*GRPO, "moe.routing_replay=false"],
    "GRPO + replay": [*GRPO, "moe.routing_replay=true"],
    "GSPO": ["algo.name=gspo", "moe.routing_replay=false"],
}
COLORS = {"GRPO": "tab:blue", "GRPO + replay": "tab:green", "GSPO": "tab:red"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="RL steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--minibatches", type=int, default=8, help="optimizer steps per rollout")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-size", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--policy", default="builtin:tiny-moe-addition-noisy", help="MoE warm start")
    p.add_argument("--out", type=Path, default=Path("runs/bench-moe-stability"))
    p.add_argument("--png", type=Path, default=None, help="curves (default: OUT/moe_stability.png)")
    return p.parse_args()


def overrides(args, seed: int, name: str) -> list[str]:
    return [
        f"model.policy={args.policy}",
        "task.name=addition",
        "task.digits=3",
        f"task.eval_size={args.eval_size}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        "algo.advantage=group",
        f"algo.num_minibatches={args.minibatches}",
        "algo.loss.kl_coef=0.0",
        f"optim.lr={args.lr}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        "train.eval_samples=0",
        "train.checkpoint_every=0",
        "train.log_samples=0",
        "log.tensorboard=false",
        f"seed={seed}",
        f"output_dir={args.out}",
        f"name={name}",
    ]


def summarise(rows: list[dict], steps: int) -> dict[str, float]:
    train = [r for r in rows if "reward/mean" in r]
    last = train[-max(1, steps // 3) :]

    def avg(key, part=train):
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        return statistics.mean(vals) if vals else float("nan")

    evals = [r for r in rows if "eval/greedy_acc" in r]
    return {
        "greedy_acc_start": evals[0]["eval/greedy_acc"],
        "greedy_acc_end": evals[-1]["eval/greedy_acc"],
        "greedy_acc_best": max(r["eval/greedy_acc"] for r in evals),
        "train_acc_first": avg("train/accuracy", train[: max(1, steps // 3)]),
        "train_acc_last": avg("train/accuracy", last),
        "churn": avg("moe/routing_churn"),
        "churn_first": avg("moe/routing_churn/layer_0"),
        "churn_last_layer": avg(f"moe/routing_churn/layer_{num_layers(rows) - 1}"),
        "expert_change": avg("moe/expert_change"),
        "clip_frac": avg("policy/clip_frac"),
        "kl_old": avg("policy/kl_old"),
        "load_cv": avg("moe/load_cv"),
        "step_s": avg("time/step_s"),
    }


def num_layers(rows: list[dict]) -> int:
    return len({k for r in rows for k in r if k.startswith("moe/routing_churn/layer_")})


def plot(results: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    panels = [
        ("eval/greedy_acc", "held-out greedy accuracy"),
        ("reward/mean", "mean reward (training samples)"),
        ("moe/routing_churn", "routing churn vs π_old (share of token × layer)"),
        ("policy/clip_frac", "clip fraction"),
        ("policy/kl_old", "KL to π_old (log π_old − log π_θ)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, panel_title) in zip(axes.flat, panels, strict=False):
        for arm, runs in results.items():
            curves = [metric_series(rows, key) for rows in runs]
            for steps, values in curves:
                ax.plot(steps, values, color=COLORS[arm], alpha=0.25, linewidth=1)
            steps = curves[0][0]
            if steps and all(c[0] == steps for c in curves):
                mean = [statistics.mean(c[1][i] for c in curves) for i in range(len(steps))]
                ax.plot(steps, mean, color=COLORS[arm], linewidth=2, label=f"{arm} (mean)")
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[-1]  # churn by depth, mean over steps and seeds
    n = max(num_layers(rows) for runs in results.values() for rows in runs)
    width = 0.8 / len(results)
    for j, (arm, runs) in enumerate(results.items()):
        per_layer = [
            statistics.mean(
                v for rows in runs for v in metric_series(rows, f"moe/routing_churn/layer_{i}")[1]
            )
            for i in range(n)
        ]
        ax.bar([i + j * width for i in range(n)], per_layer, width, color=COLORS[arm], label=arm)
    ax.set_xticks([i + width for i in range(n)], [str(i) for i in range(n)])
    ax.set_title("routing churn by layer (mean over steps, seeds)")
    ax.set_xlabel("MoE layer (0 = nearest the embeddings)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(f"MoE stability, {title}; thin lines = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_arms(
        ARMS,
        args.seeds,
        args.out,
        lambda seed, name: overrides(args, seed, name),
        lambda arm, seed: f"{arm.lower().replace(' + ', '-')}-seed{seed}",
    )

    columns = [
        ("greedy_acc_start", "held-out greedy acc, step 0"),
        ("greedy_acc_end", f"held-out greedy acc, step {args.steps}"),
        ("greedy_acc_best", "held-out greedy acc, best eval"),
        ("train_acc_first", "train acc, first third"),
        ("train_acc_last", "train acc, last third"),
        ("churn", "routing churn (all layers)"),
        ("churn_first", "routing churn, layer 0"),
        ("churn_last_layer", "routing churn, last layer"),
        ("expert_change", "expert change \\|E_new \\ E_old\\|/k"),
        ("clip_frac", "clip fraction"),
        ("kl_old", "KL to π_old"),
        ("load_cv", "expert-load CV (π_old)"),
        ("step_s", "seconds / step"),
    ]
    summaries = {
        arm: [summarise(rows, args.steps) for rows in runs] for arm, runs in results.items()
    }
    lines = markdown_table(summaries, columns, lambda key: ".2g" if key == "kl_old" else ".3f")
    png = args.png or args.out / "moe_stability.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"3-digit addition, {args.policy}, lr {args.lr:g}, {args.minibatches} minibatches/rollout"
    )
    plot(results, png, title)
    print()
    print(
        f"{title}; {args.prompts} prompts × {args.group} samples per step, {args.steps} steps, "
        f"seeds {args.seeds}, mean ± sd over seeds"
    )
    print("\n".join(lines))
    print(f"\ncurves: {png}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread); total {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
