"""FIPO vs DAPO with identical settings, 3 seeds: accuracy and response-length curves and a table.

Both arms start from the `fipo` preset (DAPO's scaffold as verl runs it: dynamic sampling on
accuracy, soft overlong punishment, ±1 reward, clip [0.2, 0.28], dual clip 10, token-mean, 8
minibatches per rollout). The DAPO arm only sets ``algo.name=dapo`` (no future-KL weights, no
sequence-drop rule); every other setting, the warm start, the data order and the seeds are the
same. Curves go to a PNG, the table to stdout.

Task: by default the built-in long-answer task, ``scratchpad`` (2-digit, 3 operands, 31-43
tokens), from the shipped ``builtin:tiny-scratchpad-noisy`` warm start, whose teacher forgot a
line's ones carry 70% of the time; ``--task addition`` uses ``builtin:tiny-addition-noisy``. The
scratchpad's layout fixes the answer length to within a few tokens, so even this task can show
little of the length growth FIPO reports.

``--task optional`` is the length testbed: the same scratchpad task from
``builtin:tiny-scratchpad-optional``, a warm start that mostly answers with the bare ``#sum``
(often wrong: its teacher forgot carries in its head) and sometimes writes the scratchpad (right),
so length and correctness go together before RL. ``--arms`` adds FIPO's 7B settings and the
control, FIPO with every weight pinned to 1. Runs go through ``seqrl compare`` (one process
each, resumable; its report lands in OUT).

    python benchmarks/fipo_vs_dapo.py                             # scratchpad, 15 steps, ~3 min
    python benchmarks/fipo_vs_dapo.py --task optional --arms DAPO FIPO "FIPO 7B" "FIPO w=1" \\
        --steps 40 --eval-size 200 --eval-samples 4 --jobs 2 --threads 1
    python benchmarks/fipo_vs_dapo.py --steps 100 --eval-size 200 # longer
    python benchmarks/fipo_vs_dapo.py --task addition --lr 5e-5
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from rich.console import Console

from _common import QUIET, markdown_table, rows_mean, run_arms, seed_curves
from seqrl.tasks import get_task

ARMS = {
    "DAPO": ["algo.name=dapo", "algo.fipo_preset=null"],
    "FIPO": [],  # official_32b: weights in [1.0, 1.2], safety threshold 10
    "FIPO 7B": ["algo.fipo_preset=7b"],  # weights in [0.8, 1.2], safety threshold 3
    # the control: FIPO 32B with every weight pinned to 1 (only the drop rule left over DAPO)
    "FIPO w=1": ["algo.loss.influence_min=1.0", "algo.loss.influence_max=1.0"],
}
COLORS = {"DAPO": "tab:blue", "FIPO": "tab:red", "FIPO 7B": "tab:orange", "FIPO w=1": "tab:gray"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=15, help="RL steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--task",
        choices=["scratchpad", "optional", "addition"],
        default="scratchpad",
        help="scratchpad (long answers), optional (the scratchpad task from a warm start that "
        "mostly answers directly) or addition; each with its shipped warm start",
    )
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["DAPO", "FIPO"])
    p.add_argument("--eval-samples", type=int, default=1, help="k of the held-out avg@k")
    p.add_argument(
        "--digits", type=int, default=None, help="per operand (scratchpad 2, addition 3)"
    )
    p.add_argument("--operands", type=int, default=3, help="scratchpad: operands per problem")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--gen-batch-prompts", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--max-gen-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5, help="the presets' learning rate")
    p.add_argument("--eval-size", type=int, default=64, help="held-out problems per evaluation")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument(
        "--warm-start", type=Path, default=None, help="an HF model dir instead of the shipped one"
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-fipo-vs-dapo"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once (jobs × threads ≤ cores)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each run")
    return p.parse_args()


SHIPPED = {
    "scratchpad": "builtin:tiny-scratchpad-noisy",
    "optional": "builtin:tiny-scratchpad-optional",
    "addition": "builtin:tiny-addition-noisy",
}
TASK = {"scratchpad": "scratchpad", "optional": "scratchpad", "addition": "addition"}


def warm_start(args) -> tuple[str, dict]:
    """--warm-start DIR, else the task's shipped warm start."""
    if args.warm_start is not None:
        return str(args.warm_start), {"source": str(args.warm_start)}
    return SHIPPED[args.task], {"source": f"the shipped {SHIPPED[args.task]}"}


def overrides(args, policy: str, budget: int) -> list[str]:
    task = [f"task.name={TASK[args.task]}", f"task.digits={args.digits}"]
    if TASK[args.task] == "scratchpad":
        task.append(f"task.operands={args.operands}")
    return [
        "preset=fipo",
        f"model.policy={policy}",
        *task,
        f"task.eval_size={args.eval_size}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={budget}",
        f"rollout.gen_batch_prompts={args.gen_batch_prompts}",
        f"rollout.max_gen_batches={args.max_gen_batches}",
        f"reward.overlong_buffer={max(1, budget // 5)}",  # L_cache = L_max/5, as 4096 of 20480
        f"optim.lr={args.lr}",
        "optim.warmup_steps=0",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"train.eval_samples={args.eval_samples}",
        *QUIET,
    ]


def summarise(rows: list[dict], steps: int) -> dict[str, float]:
    train = [r for r in rows if "reward/mean" in r]
    last = train[-max(1, steps // 3) :]  # the last third of the steps

    def avg(key, part=train):
        return rows_mean(part, key)

    evals = [r for r in rows if "eval/greedy_acc" in r]
    return {
        "greedy_acc_start": evals[0]["eval/greedy_acc"],
        "greedy_acc_end": evals[-1]["eval/greedy_acc"],
        "sampled_acc_start": evals[0].get("eval/sampled_acc", float("nan")),
        "sampled_acc_end": evals[-1].get("eval/sampled_acc", float("nan")),
        "sampled_acc_best": max(r.get("eval/sampled_acc", float("nan")) for r in evals),
        "train_acc_last": avg("train/accuracy", last),
        "len_mean_first": train[0]["response_len/mean"],
        "len_mean_first5": avg("response_len/mean", train[:5]),
        "train_acc_first5": avg("train/accuracy", train[:5]),
        "half_len_step": half_length_step(train),
        "len_mean_last": avg("response_len/mean", last),
        "len_median_last": avg("response_len/median", last),
        "len_corr": avg("response_len/corr_with_correct"),
        "policy_kl": avg("policy/kl_old"),
        "weight_mean": avg("fipo/weight_mean"),
        "weight_above_1": avg("fipo/weight_above_1_frac"),
        "gen_batches": avg("sampling/gen_batches"),
        "step_s": avg("time/step_s"),
    }


def half_length_step(train: list[dict]) -> float:
    """The first step whose mean response length is half-way from step 1's to the run's longest."""
    lengths = [r["response_len/mean"] for r in train]
    half = (lengths[0] + max(lengths)) / 2
    return next(r["step"] for r, n in zip(train, lengths, strict=True) if n >= half)


def plot(results: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    panels = [
        ("eval/greedy_acc", "held-out greedy accuracy"),
        ("eval/sampled_acc", "held-out sampled accuracy (avg@k)"),
        ("response_len/corr_with_correct", "corr(response length, correct)"),
        ("train/accuracy", "training accuracy (all sampled responses)"),
        ("response_len/mean", "mean response length (tokens)"),
        ("response_len/median", "median response length (tokens)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    colors = COLORS
    for ax, (key, panel_title) in zip(axes.flat, panels, strict=True):
        for arm, runs in results.items():
            seed_curves(ax, runs, key, colors[arm], arm)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"FIPO vs DAPO, {title}; thin lines = seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if args.digits is None:
        args.digits = 2 if TASK[args.task] == "scratchpad" else 3
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    kwargs = {"operands": args.operands} if TASK[args.task] == "scratchpad" else {}
    task = get_task(TASK[args.task], digits=args.digits, seed=1234, **kwargs)
    budget = task.max_new_tokens
    start = time.perf_counter()
    policy, sft = warm_start(args)
    console.print(f"warm start: {policy} ({sft['source']})")

    results = run_arms(
        {arm: ARMS[arm] for arm in args.arms},
        args.seeds,
        args.out,
        overrides(args, policy, budget),
        jobs=args.jobs,
        threads=args.threads,
    )

    columns = [
        ("greedy_acc_start", "held-out greedy acc, step 0"),
        ("greedy_acc_end", f"held-out greedy acc, step {args.steps}"),
        ("sampled_acc_start", f"held-out avg@{args.eval_samples}, step 0"),
        ("sampled_acc_end", f"held-out avg@{args.eval_samples}, step {args.steps}"),
        ("sampled_acc_best", f"held-out avg@{args.eval_samples}, best eval"),
        ("train_acc_last", "train acc, last third"),
        ("len_mean_first", "mean length, step 1"),
        ("len_mean_first5", "mean length, steps 1–5"),
        ("half_len_step", "step where length is half-way to its peak"),
        ("train_acc_first5", "train acc, steps 1–5"),
        ("len_mean_last", "mean length, last third"),
        ("len_median_last", "median length, last third"),
        ("len_corr", "corr(length, correct)"),
        ("policy_kl", "policy KL (log π_old − log π)"),
        ("weight_mean", "FIPO weight mean"),
        ("weight_above_1", "FIPO weights > 1"),
        ("gen_batches", "generation batches / step"),
        ("step_s", "seconds / step"),
    ]
    summaries = {
        arm: [summarise(rows, args.steps) for rows in runs] for arm, runs in results.items()
    }
    lines = markdown_table(summaries, columns)
    png = args.out / f"fipo_vs_dapo_{args.task}.png"
    title = f"{args.task} ({args.digits} digits"
    title += f", {args.operands} operands)" if TASK[args.task] == "scratchpad" else ")"
    plot(results, png, title)
    print()
    print(
        f"{title}, budget {budget} tokens, {args.prompts} prompts × {args.group} samples per "
        f"step, {args.steps} steps, seeds {args.seeds}, mean ± sd over seeds"
    )
    print(f"warm start: {policy} ({sft['source']})")
    print("\n".join(lines))
    print(f"\ncurves: {png}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({args.threads} threads per run, {args.jobs} at once); total "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
