"""SPPO (N = 1) vs GRPO (N = 8) vs PPO-GAE (N = 1) on the built-in addition task.

The SPPO paper's headline (arXiv 2604.08865 §5.1): one sample per prompt and a learned prompt
critic reach GRPO's accuracy much sooner in wall-clock time. Each arm starts from its seqrl
preset (sppo, grpo, ppo), and everything but the advantage estimator is then set equal, as the
paper ran its baselines (App. E): the warm start (``--warm-start``, default the presets'
builtin:tiny-addition-noisy), prompts per step, steps, actor learning rate, 2 updates per
rollout, sampling temperature 0.6 (train and eval), weight decay 0.01, the held-out set, and the
policy loss, verl's vanilla clipped surrogate (token ratio, clip 0.2, dual clip 3, token-mean, no
KL) for all three: the GRPO arm drops its preset's per-sequence mean and its KL term (β = 0.04 to
a frozen reference, which would also add a reference forward to its step time). So the arms
differ only in the advantage: R − V(prompt) from a scalar critic (SPPO, 1 sample per prompt),
group-normalised rewards (GRPO, 8 samples), GAE over a token critic (PPO, 1 sample; its critic
warm-up steps train only the critic).

Every (algorithm, seed) runs through ``seqrl compare``: its own ``seqrl train`` process with
``--threads`` CPU threads (default 1), interleaved by seed with the arms' order rotated from seed
to seed, ``--jobs`` at once (default 1, one after the other). With ``--jobs`` > 1 the wall-clock
figures include the neighbouring runs' contention (alike for every arm, but not a quiet-machine
time). Running the same command again keeps the finished runs and only summarises them (e.g.
with another ``--target-gain``); an interrupted run starts again (no checkpoints are saved); a
run in OUT made with other settings is refused: give another ``--out``. compare's own report
(report.md, summary.json, curves, commands.sh, the resolved configs) lands in OUT beside the runs.

Reported per run and summarised over seeds (mean ± sample std):
- steps and time to target: RL steps, and training wall-clock (rollout + critic + policy
  update, evaluation excluded), until held-out greedy accuracy first reaches
  ``start + --target-gain`` (start = the shared warm start's accuracy on the held-out set),
  "not reached" if it never does; steps are resolved to ``--eval-every``, and wall-clock on a
  shared machine moves with its load, so compare times from one run on a quiet machine;
- rollout tokens to target: sampled response tokens generated for training until then;
- final held-out greedy accuracy;
- peak memory: the run process's peak resident set size, as ``seqrl compare`` records it
  (``peak_rss_mib`` in OUT/summary.json, ``ru_maxrss`` of the process; it includes the Python +
  torch baseline);
- a PNG of held-out accuracy vs training wall-clock.

- the share of each arm's step spent in the rollout (generation, rewards, advantages);
- with ``--wall-clock``: the time at which GRPO's seed-mean curve, smoothed, peaks, when each
  other arm's smoothed curve first reaches that peak value, and when it reaches its own peak
  (seed-mean curves on a shared training-time grid, moving average over a fifth of the budget).

``--task scratchpad`` is the generation-dominated testbed: 31–43-token answers from
``builtin:tiny-scratchpad-noisy`` (``--warm-start`` default follows the task), many prompts per
step, the fast sampler, and an equal training-time budget per run (``--wall-clock S``,
``train.time_limit_s``); ``sppo_small_critic`` (SPPO with the nano critic, smaller than the
policy) is a fourth arm.

    python benchmarks/sppo_vs_grpo.py                       # defaults: ≈ 5 min on 2 quiet cores
    python benchmarks/sppo_vs_grpo.py --steps 150 --seeds 0 1 2 3 4   # longer
    python benchmarks/sppo_vs_grpo.py --task scratchpad --algos grpo sppo sppo_small_critic \\
        --prompts-per-step 32 --wall-clock 240 --out benchmarks/results/sppo_vs_grpo_scratchpad
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _common import QUIET, run_arms, slug
from seqrl.compare import Arm, _common_grid, run_name
from seqrl.train.metrics import read_metrics

# preset → samples per prompt (the presets' own)
ALGOS = {"sppo": 1, "grpo": 8, "ppo": 1, "sppo_small_critic": 1}
TASKS = {  # --task → its settings and shipped warm start
    "addition": (["task.name=addition", "task.digits=3"], "builtin:tiny-addition-noisy"),
    "scratchpad": (
        ["task.name=scratchpad", "task.digits=2", "task.operands=3"],
        "builtin:tiny-scratchpad-noisy",
    ),
}
# What every arm shares, the SPPO paper's settings for all its methods (App. E, 1.5B recipe).
SHARED = [
    "rollout.temperature=0.6",
    "train.eval_temperature=0.6",
    "optim.weight_decay=0.01",
    "algo.num_minibatches=2",
]
# The GRPO preset is DeepSeekMath's (per-sequence mean, k3 KL 0.04); as the SPPO paper's baseline
# it runs verl's vanilla loss like the others: token-mean, dual clip 3, no KL.
ARM = {
    "sppo": [],
    "grpo": ["algo.loss.agg=token-mean", "algo.loss.dual_clip_c=3.0", "algo.loss.kl_coef=0.0"],
    "ppo": [],
    "sppo_small_critic": [],
}


def arm_overrides(args, algo: str) -> list[str]:
    """What makes one arm: its preset, its sample count, its loss alignment, PPO's warm-up."""
    extra = [f"preset={algo}", *ARM[algo], f"rollout.group_size={ALGOS[algo]}"]
    if algo == "ppo":
        extra.append(f"critic.warmup_steps={args.ppo_critic_warmup}")
    return extra


def common_overrides(args) -> list[str]:
    """What every arm shares (the seed, name and directory of each run are compare's)."""
    length = [f"train.steps={args.steps}"]
    if args.wall_clock is not None:  # the time budget ends every run (steps: a safety cap)
        length = [f"train.time_limit_s={args.wall_clock}", f"train.steps={10**6}"]
    return [
        *SHARED,
        *TASKS[args.task][0],
        f"model.policy={args.warm_start or TASKS[args.task][1]}",
        f"optim.lr={args.lr}",
        f"rollout.prompts_per_step={args.prompts_per_step}",
        *length,
        f"train.eval_every={args.eval_every}",
        f"task.eval_size={args.eval_size}",
        "train.eval_samples=1",
        *QUIET,
    ]


def run_result(algo: str, seed: int, rows: list[dict], prompts_per_step: int) -> dict:
    """One run's held-out curve (step, training time, rollout tokens, accuracy) and totals."""
    batch = prompts_per_step * ALGOS[algo]
    elapsed, tokens, curve, rollout = 0.0, 0.0, [], 0.0
    for r in rows:  # step records then eval records of the same step, in file order
        if "time/step_s" in r:
            elapsed += r["time/step_s"]
            rollout += r["time/rollout_s"]
            tokens += r["response_len/mean"] * batch
        if "eval/greedy_acc" in r:
            curve.append(
                {
                    "step": r["step"],
                    "time_s": elapsed,
                    "tokens": tokens,
                    "acc": r["eval/greedy_acc"],
                }
            )
    return {
        "algo": algo,
        "seed": seed,
        "curve": curve,
        "train_time_s": elapsed,
        "rollout_share": rollout / elapsed if elapsed else float("nan"),
        "rollout_tokens": tokens,
    }


def smoothed_mean_curve(results: list[dict], algo: str) -> tuple[list[float], list[float]]:
    """The seeds' mean held-out accuracy of ``algo`` on a shared training-time grid (51 points up
    to its shortest run), smoothed by a centred moving average over 11 points (a fifth of it)."""
    curves = [[(p["step"], p["time_s"], p["acc"]) for p in r["curve"]] for r in results
              if r["algo"] == algo]  # fmt: skip
    grid, rows = _common_grid(curves, axis=1)
    if not grid:
        return [], []
    mean = [statistics.fmean(col) for col in zip(*rows, strict=True)]
    half = 5
    smooth = [statistics.fmean(mean[max(0, i - half) : i + half + 1]) for i in range(len(mean))]
    return grid, smooth


def time_to_peaks(results: list[dict], reference: str = "grpo") -> list[str]:
    """Markdown rows: GRPO's smoothed peak, and each arm's time to it and to its own peak."""
    ref_t, ref_y = smoothed_mean_curve(results, reference)
    if not ref_t:
        return []
    i_ref = max(range(len(ref_y)), key=ref_y.__getitem__)
    peak = ref_y[i_ref]
    lines = [
        f"{reference}'s smoothed peak: {peak:.3f} at {ref_t[i_ref]:.0f} s of training",
        "",
        f"| algo | time to {reference}'s smoothed peak (s) | own smoothed peak | at (s) |",
        "|---|---|---|---|",
    ]
    for algo in dict.fromkeys(r["algo"] for r in results):
        t, y = smoothed_mean_curve(results, algo)
        hit = next((x for x, v in zip(t, y, strict=True) if v >= peak - 1e-12), None)
        i = max(range(len(y)), key=y.__getitem__)
        reached = "not reached" if hit is None else f"{hit:.0f}"
        lines.append(f"| {algo} | {reached} | {y[i]:.3f} | {t[i]:.0f} |")
    return lines


def peak_memory(out: Path) -> dict[tuple[str, int], float | None]:
    """{(arm label, seed): peak RSS in MiB} from compare's OUT/summary.json ({} if it has none)."""
    path = out / "summary.json"
    if not path.exists():
        return {}
    return {(r["arm"], r["seed"]): r.get("peak_rss_mib") for r in json.loads(path.read_text())}


def _reach(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["acc"] >= target - 1e-12), None)


def _mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    return f"{statistics.mean(xs):.3g} ± {statistics.stdev(xs):.2g}"


def summarise(results: list[dict], target_gain: float, out_dir: Path) -> str:
    start = statistics.mean(r["curve"][0]["acc"] for r in results)  # the same warm start
    target = start + target_gain
    lines = [
        f"held-out greedy accuracy at step 0 (shared warm start): {start:.3f}; "
        f"target = start + {target_gain:g} = {target:.3f}",
        "",
        "| algo | N | reached target | steps to target | time to target (s) | "
        "rollout tokens to target | final acc | best acc | train time (s) | rollout share | "
        "rollout tokens | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in ALGOS:
        rs = [r for r in results if r["algo"] == algo]
        if not rs:
            continue
        hits = [_reach(r["curve"], target) for r in rs]
        reached = [h for h in hits if h is not None]
        lines.append(
            f"| {algo} | {ALGOS[algo]} | {len(reached)}/{len(rs)} "
            f"| {_mean_std([h['step'] for h in reached]) if reached else 'not reached'} "
            f"| {_mean_std([h['time_s'] for h in reached]) if reached else 'not reached'} "
            f"| {_mean_std([h['tokens'] for h in reached]) if reached else 'not reached'} "
            f"| {_mean_std([r['curve'][-1]['acc'] for r in rs])} "
            f"| {_mean_std([max(p['acc'] for p in r['curve']) for r in rs])} "
            f"| {_mean_std([r['train_time_s'] for r in rs])} "
            f"| {_mean_std([r['rollout_share'] for r in rs])} "
            f"| {_mean_std([r['rollout_tokens'] for r in rs])} "
            f"| {_mean_std([r['peak_rss_mib'] for r in rs])} |"
        )
    lines.append("")
    lines.append(
        "per seed (step to target / time to target s / final acc): "
        + "; ".join(
            f"{r['algo']} s{r['seed']}: "
            + (f"{h['step']} / {h['time_s']:.1f}" if (h := _reach(r["curve"], target)) else "–")
            + f" / {r['curve'][-1]['acc']:.3f}"
            for r in results
        )
    )
    lines.append("peak RSS: of one run process (seqrl train), the Python + torch baseline included")
    if any(r["algo"] == "grpo" for r in results):
        lines += ["", *time_to_peaks(results)]
    _plot(results, target, out_dir / "sppo_vs_grpo.png")
    return "\n".join(lines)


def _plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "sppo": "tab:blue",
        "grpo": "tab:orange",
        "ppo": "tab:green",
        "sppo_small_critic": "tab:purple",
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for algo in ALGOS:
        for i, r in enumerate(x for x in results if x["algo"] == algo):
            ax.plot(
                [p["time_s"] for p in r["curve"]],
                [p["acc"] for p in r["curve"]],
                color=colours[algo],
                marker="o",
                markersize=3,
                alpha=0.7,
                label=f"{algo} (N = {ALGOS[algo]})" if i == 0 else None,
            )
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(args, rows: dict[str, list[list[dict]]]) -> list[dict]:
    """Each run's result (``run_result``) with its peak memory from compare's summary.json."""
    memory = peak_memory(args.out)
    results = []
    for algo in args.algos:
        for seed, seed_rows in zip(args.seeds, rows[algo], strict=True):
            result = run_result(algo, seed, seed_rows, args.prompts_per_step)
            result["peak_rss_mib"] = memory.get((slug(algo), seed))
            results.append(result)
    return results


def finished_rows(args) -> dict[str, list[list[dict]]]:
    """--summarise-only: the metrics of the finished runs in OUT (nothing is run)."""
    runs = {}
    for algo in args.algos:
        for seed in args.seeds:
            run_dir = args.out / "runs" / run_name(Arm(slug(algo), None), seed)
            if not (run_dir / "final").exists():
                sys.exit(f"{run_dir} has not finished; run without --summarise-only to finish it")
            runs.setdefault(algo, []).append(read_metrics(run_dir))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["sppo", "grpo", "ppo"], choices=list(ALGOS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--target-gain", type=float, default=0.10)
    p.add_argument("--ppo-critic-warmup", type=int, default=2)
    p.add_argument("--task", choices=sorted(TASKS), default="addition")
    p.add_argument(
        "--wall-clock", type=float, default=None, help="training seconds per run (not --steps)"
    )
    p.add_argument("--warm-start", default=None, help="model.policy (default: the task's)")
    p.add_argument("--lr", type=float, default=2e-5, help="actor learning rate, every arm")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sppo_vs_grpo"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once (jobs × threads ≤ cores)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    p.add_argument(
        "--summarise-only",
        action="store_true",
        help="print the table of the finished runs in OUT, run nothing",
    )
    args = p.parse_args()
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would be the same run
    args.algos = list(dict.fromkeys(args.algos))
    if args.summarise_only:
        print(summarise(collect(args, finished_rows(args)), args.target_gain, args.out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = run_arms(
        {algo: arm_overrides(args, algo) for algo in args.algos},
        args.seeds,
        args.out,
        common_overrides(args),
        jobs=args.jobs,
        threads=args.threads,
    )
    table = summarise(collect(args, rows), args.target_gain, args.out)
    header = (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s) per run, {args.jobs} run(s) at once; "
        f"total {time.perf_counter() - t0:.0f} s\n"
        f"command: python benchmarks/sppo_vs_grpo.py {' '.join(sys.argv[1:])}\n"
        f"steps {args.steps}, {args.prompts_per_step} prompts/step, eval every {args.eval_every} "
        f"steps on {args.eval_size} held-out prompts; task {args.task}, warm start "
        f"{args.warm_start or TASKS[args.task][1]}, lr {args.lr:g}; "
        f"shared: {' '.join(SHARED)}; grpo: {' '.join(ARM['grpo'])}\n"
    )
    (args.out / "summary.md").write_text(header + "\n" + table + "\n")
    print(header + "\n" + table)
    print(f"plot: {args.out / 'sppo_vs_grpo.png'}; compare's report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
