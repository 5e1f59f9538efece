"""GSPO §5.4 testbed: GRPO vs GSPO trained on noisy inference-engine log-probs, 3 seeds.

The paper's claim: GSPO's sequence-level likelihoods tolerate the precision gap between an
inference engine and the training engine, so GSPO can take the engine's log-probs as π_old and
skip the recompute, where token-level ratios (GRPO) are more sensitive. Here both arms take the
sampler's log-probs as π_old (``rollout.old_logprobs_source=sampler``), and
``rollout.logprob_noise=σ`` adds N(0, σ²) to each sampled token's log-prob, i.i.d., as an engine
with a precision gap of that size would report (the samples themselves are exact). At θ = θ_old
a token ratio is then exp(−ε_t), and GSPO's sequence ratio exp(−mean_t ε_t), whose spread is
σ/√L for a response of L tokens: smaller, but set against a clip range 500× narrower
([1 − 3e-4, 1 + 4e-4] vs GRPO's [0.8, 1.27]).

Both arms start from the ``gspo`` preset (P = 8 prompts × G = 8, 4 minibatches per rollout, lr
2e-5, no KL term); the GRPO arm is the GSPO paper's baseline (token ratio clipped to
[0.8, 1.27], no KL, §5.1). Per arm and σ (mean ± sd over seeds): held-out accuracy (avg@4) at
start, end and best, training accuracy, token and sequence clip fractions, the ratio's range,
KL to π_old. Every run is its own process through ``seqrl compare`` (its report is in OUT).

    python benchmarks/engine_noise.py                                # addition, σ 0/0.05/0.2
    python benchmarks/engine_noise.py --task scratchpad --steps 40   # 31–43-token answers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from _common import QUIET, machine_line, rows_mean, run_arms, seed_curves, sweep_tables

ARMS = {
    "GRPO": ["algo.name=grpo", "algo.loss.clip_high=0.27", "algo.loss.kl_coef=0.0"],
    "GSPO": ["algo.name=gspo"],
}
COLORS = {"GRPO": "tab:blue", "GSPO": "tab:red"}
TASKS = {  # task → its shipped warm start and settings
    "addition": ("builtin:tiny-addition-noisy", ["task.name=addition", "task.digits=3"]),
    "scratchpad": (
        "builtin:tiny-scratchpad-noisy",
        ["task.name=scratchpad", "task.digits=2", "task.operands=3"],
    ),
}
METRIC = "eval/sampled_acc"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="addition")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.2], help="σ values")
    p.add_argument("--steps", type=int, default=60, help="RL steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (jobs × threads ≤ cores)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    p.add_argument("--out", type=Path, default=None, help="default runs/bench-engine-noise-TASK")
    p.add_argument("--png", type=Path, default=None, help="curves (default: OUT/engine_noise.png)")
    return p.parse_args()


def arm_label(arm: str, sigma: float) -> str:
    return f"{arm}, sigma={sigma:g}"


def overrides(args) -> list[str]:
    policy, task = TASKS[args.task]
    return [
        "preset=gspo",
        f"model.policy={policy}",
        *task,
        f"task.eval_size={args.eval_size}",
        "rollout.old_logprobs_source=sampler",
        f"optim.lr={args.lr}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        "train.eval_samples=4",
        *QUIET,
    ]


def summarise(rows: list[dict], steps: int) -> dict[str, float]:
    train = [r for r in rows if "reward/mean" in r]
    last = train[-max(1, steps // 3) :]

    def avg(key, part=train):
        return rows_mean(part, key)

    evals = [r for r in rows if METRIC in r]
    return {
        "acc_start": evals[0][METRIC],
        "acc_end": evals[-1][METRIC],
        "acc_best": max(r[METRIC] for r in evals),
        "train_acc_last": avg("train/accuracy", last),
        "clip_frac": avg("policy/clip_frac"),
        "seq_clip_frac": avg("policy/seq_clip_frac"),
        "ratio_min": avg("policy/ratio_min"),
        "ratio_max": avg("policy/ratio_max"),
        "kl_old": avg("policy/kl_old"),
        "len": avg("response_len/mean"),
    }


def plot(results: dict[str, list[list[dict]]], sigmas: list[float], path: Path, title: str):
    panels = [
        (METRIC, "held-out accuracy (avg@4)"),
        ("policy/clip_frac", "token clip fraction"),
        ("policy/kl_old", "KL to π_old (the noisy μ)"),
    ]
    fig, axes = plt.subplots(len(sigmas), len(panels), figsize=(14, 3.3 * len(sigmas)))
    axes = [axes] if len(sigmas) == 1 else axes
    for row, sigma in zip(axes, sigmas, strict=True):
        for ax, (key, panel_title) in zip(row, panels, strict=True):
            for arm in ARMS:
                seed_curves(ax, results[arm_label(arm, sigma)], key, COLORS[arm], arm)
            ax.set_title(f"{panel_title}, σ={sigma:g}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"GRPO vs GSPO on noisy engine log-probs, {title}; thin lines = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    out = args.out or Path(f"runs/bench-engine-noise-{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    arms = {
        arm_label(arm, sigma): [*extra, f"rollout.logprob_noise={sigma}"]
        for sigma in args.noise
        for arm, extra in ARMS.items()
    }
    results = run_arms(
        arms, args.seeds, out, overrides(args), jobs=args.jobs, threads=args.threads, metric=METRIC
    )
    columns = [
        ("acc_start", "held-out avg@4, step 0"),
        ("acc_end", f"held-out avg@4, step {args.steps}"),
        ("acc_best", "held-out avg@4, best eval"),
        ("train_acc_last", "train acc, last third"),
        ("clip_frac", "token clip fraction"),
        ("seq_clip_frac", "sequence clip fraction"),
        ("ratio_min", "smallest ratio per step"),
        ("ratio_max", "largest ratio per step"),
        ("kl_old", "KL to π_old"),
        ("len", "mean response length"),
    ]
    title = f"{args.task}, lr {args.lr:g}, {args.steps} steps"
    png = args.png or out / "engine_noise.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.noise, png, title)
    print(f"\n{title}; seeds {args.seeds}, mean ± sd over seeds")
    print(
        sweep_tables(
            results,
            args.noise,
            list(ARMS),
            arm_label,
            lambda rows: summarise(rows, args.steps),
            columns,
            lambda sigma: f"rollout.logprob_noise σ = {sigma:g}",
        )
    )
    print(f"\ncurves: {png}; compare's report: {out / 'report.md'}")
    print(machine_line(args.threads, args.jobs, time.perf_counter() - start))


if __name__ == "__main__":
    main()
