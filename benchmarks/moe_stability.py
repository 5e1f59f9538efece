"""GSPO §5.3 on a tiny MoE: GRPO without Routing Replay, GRPO with it, GSPO without it, over a
controlled routing churn; 3 seeds, every run its own process through ``seqrl compare``.

The paper's claim: on MoE policies the experts a token activates move after every update (about
10% on its 48-layer model), so token-level importance ratios (GRPO) compare different
sub-networks and training needs Routing Replay, while GSPO's length-normalised sequence ratio
stays stable without it. A 4-layer model re-routes only 1–3% by itself, so ``--reroute`` adds a
controlled churn on top (``moe.reroute_frac`` = p: in every training forward after a rollout's
first optimizer step, a share p of the (token, layer) pairs trade their weaker expert for the
runner-up; p = 0.2 makes the expert change |E_new \\ E_old| / k about the paper's 10%).

All arms start from the shipped ``builtin:tiny-moe-addition-noisy`` (a Qwen3-MoE, 4 blocks of 8
experts, top-2, supervised warm start on 3-digit addition) and share the task, data order,
seeds, group size, learning rate, minibatches per rollout (default 8, so 7 of 8 updates are
off-policy), p and no KL term. They differ only in the loss (``grpo``: token ratio clipped to
[0.8, 1.27], the GSPO paper's tuned range for its GRPO baseline, §5.1; ``gspo``: sequence ratio
clipped to [3e-4, 4e-4]) and ``moe.routing_replay``.

Reported per arm and p (mean ± sd over seeds): held-out greedy accuracy at start, end and best,
training accuracy, ``moe/routing_churn`` (share of (response token, layer) pairs whose top-k set
under π_θ differs from π_old, pooled over the updates after the first of each rollout; under
replay it is the router's *own* choice that is compared, the experts used are the recorded
ones), ``moe/expert_change`` (|E_new \\ E_old| / k), clip fractions, KL to π_old, the ratio's
range, expert-load CV. compare's report (95% intervals, curves, commands) is in OUT.

    python benchmarks/moe_stability.py                       # p = 0, 20 steps × 9 runs, minutes
    python benchmarks/moe_stability.py --reroute 0 0.2 0.5 --steps 40 --jobs 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from _common import QUIET, machine_line, rows_mean, run_arms, seed_curves, sweep_tables

# GRPO as the GSPO paper's baseline (§5.1): clip [0.2, 0.27] (its tuned range), no KL term
GRPO = ["algo.name=grpo", "algo.loss.clip_high=0.27"]
ARMS = {
    "GRPO": [*GRPO, "moe.routing_replay=false"],
    "GRPO + replay": [*GRPO, "moe.routing_replay=true"],
    "GSPO": ["algo.name=gspo", "moe.routing_replay=false"],
}
COLORS = {"GRPO": "tab:blue", "GRPO + replay": "tab:green", "GSPO": "tab:red"}


def arm_label(arm: str, p: float) -> str:
    return f"{arm}, p={p:g}"


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
    p.add_argument(
        "--reroute", type=float, nargs="+", default=[0.0], help="moe.reroute_frac values (p)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once (jobs × threads ≤ cores)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    p.add_argument("--png", type=Path, default=None, help="curves (default: OUT/moe_stability.png)")
    return p.parse_args()


def overrides(args) -> list[str]:
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
        *QUIET,
    ]


def summarise(rows: list[dict], steps: int) -> dict[str, float]:
    train = [r for r in rows if "reward/mean" in r]
    last = train[-max(1, steps // 3) :]

    def avg(key, part=train):
        return rows_mean(part, key)

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
        "ratio_min": min(
            (r["policy/ratio_min"] for r in train if "policy/ratio_min" in r), default=float("nan")
        ),
        "ratio_max": max(
            (r["policy/ratio_max"] for r in train if "policy/ratio_max" in r), default=float("nan")
        ),
        "load_cv": avg("moe/load_cv"),
        "step_s": avg("time/step_s"),
    }


def num_layers(rows: list[dict]) -> int:
    return len({k for r in rows for k in r if k.startswith("moe/routing_churn/layer_")})


def plot(results: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    """One row of panels per p: held-out accuracy, churn, clip fraction, KL to π_old."""
    panels = [
        ("eval/greedy_acc", "held-out greedy accuracy"),
        ("moe/routing_churn", "routing churn vs π_old"),
        ("policy/clip_frac", "clip fraction"),
        ("policy/kl_old", "KL to π_old"),
    ]
    ps = sorted({label.rsplit("p=", 1)[1] for label in results}, key=float)
    fig, axes = plt.subplots(len(ps), len(panels), figsize=(16, 3.4 * len(ps)), squeeze=False)
    for row, p in zip(axes, ps, strict=True):
        for ax, (key, panel_title) in zip(row, panels, strict=True):
            for arm in ARMS:
                seed_curves(ax, results.get(arm_label(arm, float(p)), []), key, COLORS[arm], arm)
            ax.set_title(f"{panel_title}, p={p}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"MoE stability under re-routing p, {title}; thin lines = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    arms = {
        arm_label(arm, p): [*extra, f"moe.reroute_frac={p}"]
        for p in args.reroute
        for arm, extra in ARMS.items()
    }
    results = run_arms(
        arms, args.seeds, args.out, overrides(args), jobs=args.jobs, threads=args.threads
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
        ("ratio_min", "smallest ratio seen"),
        ("ratio_max", "largest ratio seen"),
        ("load_cv", "expert-load CV (π_old)"),
        ("step_s", "seconds / step"),
    ]
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
    print(
        sweep_tables(
            results,
            args.reroute,
            list(ARMS),
            arm_label,
            lambda rows: summarise(rows, args.steps),
            columns,
            lambda p: f"moe.reroute_frac = {p:g}",
        )
    )
    print(f"\ncurves: {png}; compare's report: {args.out / 'report.md'}")
    print(machine_line(args.threads, args.jobs, time.perf_counter() - start))


if __name__ == "__main__":
    main()
