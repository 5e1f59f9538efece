"""PNG plots of a run's metrics.jsonl: ``seqrl plot RUN_DIR`` → RUN_DIR/plots/*.png, and several
runs overlaid (``seqrl plot RUN RUN ... --out DIR``), one colour per run."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from seqrl.train.metrics import metric_series, read_metrics

PANELS = {
    "reward": ("reward", ["reward/mean"]),
    "accuracy": ("held-out accuracy", ["eval/greedy_acc", "eval/sampled_acc"]),
    "accuracy_by_group": ("held-out greedy accuracy per group", ["eval/greedy_acc/*"]),
    "length": (
        "response length (tokens)",
        [
            "response_len/min",
            "response_len/q25",
            "response_len/mean",
            "response_len/median",
            "response_len/q75",
            "response_len/max",
        ],
    ),
    "length_vs_correct": (
        "correlation of response length with correctness / reward",
        ["response_len/corr_with_correct", "response_len/corr_with_reward"],
    ),
    "sampling": (
        "dynamic sampling: groups and generation batches per step",
        [
            "sampling/kept_groups",
            "sampling/dropped_groups",
            "sampling/gen_batches",
            "sampling/short_of_target",
        ],
    ),
    "clip": (
        "clip fractions",
        [
            "policy/clip_frac",
            "policy/clip_frac_low",
            "policy/clip_frac_high",
            "policy/dual_clip_frac",
            "policy/seq_clip_frac",
        ],
    ),
    "kl_entropy": ("policy KL to π_old and entropy", ["policy/kl_old", "policy/entropy"]),
    "critic": (
        "critic",
        [
            "critic/loss",
            "critic/pred_mean",
            "critic/calibration_pearson",
            "critic/calibration_spearman",
        ],
    ),
    "grad_norm": ("gradient norm (before clipping)", ["policy/grad_norm"]),
    "fipo": (
        "FIPO influence weights",
        [
            "fipo/weight_mean",
            "fipo/weight_above_1_frac",
            "fipo/weight_at_min_frac",
            "fipo/weight_at_max_frac",
            "fipo/safety_frac",
        ],
    ),
    "moe_churn": (
        "MoE routing churn vs π_old (share of response tokens × layers)",
        ["moe/routing_churn", "moe/expert_change", "moe/routing_churn/layer_*"],
    ),
    "moe_load": ("MoE expert load under π_old", ["moe/load_cv", "moe/load_max"]),
    "time": (
        "seconds per step",
        ["time/step_s", "time/rollout_s", "time/train_s", "time/critic_s"],
    ),
}
"""Panel name → (title, metric keys); a key ending in ``*`` stands for every matching metric."""


def _expand(records: list[dict], keys: list[str]) -> list[str]:
    """``keys`` with each ``prefix*`` pattern replaced by the matching metric names, sorted."""
    names = sorted({k for r in records for k in r}, key=_natural)
    out = []
    for key in keys:
        out += [n for n in names if fnmatchcase(n, key)] if key.endswith("*") else [key]
    return out


def _natural(name: str) -> tuple:
    """Sort key that puts layer_10 after layer_9."""
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, -1)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write one PNG per panel that has data, plus overview.png; returns the paths written."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a seqrl run directory?")
    records = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    drawn = {
        name: (title, [k for k in _expand(records, keys) if metric_series(records, k)[0]])
        for name, (title, keys) in PANELS.items()
    }
    drawn = {name: v for name, v in drawn.items() if v[1]}
    written = []
    for name, (title, keys) in drawn.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        _draw(ax, records, title, keys)
        written.append(out_dir / f"{name}.png")
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if drawn:
        cols = 2
        rows = -(-len(drawn) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(12, 3.4 * rows), squeeze=False)
        for ax, (title, keys) in zip(axes.flat, drawn.values(), strict=False):
            _draw(ax, records, title, keys)
        for ax in list(axes.flat)[len(drawn) :]:
            ax.axis("off")
        fig.suptitle(run_dir.name)
        fig.tight_layout()
        written.append(out_dir / "overview.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    calibration = plot_calibration(run_dir)
    return written + ([calibration] if calibration else [])


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Overlay several runs: one PNG per panel that any run has data for, in ``out_dir``.

    Each run has its own colour and the legend names it (its directory name; the parent's too
    when two runs share a name); each metric of a panel has its own line style.
    """
    runs = [Path(r) for r in run_dirs]
    for run in runs:
        if not (run / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{run} has no metrics.jsonl: is it a seqrl run directory?")
    names = [r.name for r in runs]
    names = [f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]
    records = [read_metrics(r) for r in runs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    written = []
    for panel, (title, keys) in PANELS.items():
        lines = []
        for i, recs in enumerate(records):
            present = [k for k in _expand(recs, keys) if metric_series(recs, k)[0]]
            lines += [(i, j, key) for j, key in enumerate(present)]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, j, key in lines:
            steps, values = metric_series(records[i], key)
            marker = "o" if key.startswith("eval/") else None
            ax.plot(
                steps,
                values,
                color=colours[i % len(colours)],
                linestyle=styles[j % len(styles)],
                marker=marker,
                markersize=3,
                label=f"{names[i]}: {key}",
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"{panel}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_calibration(run_dir: str | Path) -> Path | None:
    """The critic's predicted success probability vs the empirical pass rate per held-out
    prompt, first and last eval (from calibration.jsonl): plots/calibration.png, or None."""
    import json

    path = Path(run_dir) / "calibration.jsonl"
    if not path.exists():
        return None
    evals = [json.loads(x) for x in path.read_text().splitlines() if x]
    if not evals:
        return None
    shown = [evals[0], evals[-1]] if len(evals) > 1 else evals
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.2), squeeze=False)
    for ax, e in zip(axes.flat, shown, strict=True):
        ax.scatter(e["pass_rate"], e["predicted"], s=12, alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("empirical pass rate (k samples)")
        ax.set_ylabel("critic prediction")
        ax.set_title(f"step {e['step']}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"critic calibration: {Path(run_dir).name}")
    fig.tight_layout()
    out = Path(run_dir) / "plots" / "calibration.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _draw(ax, records: list[dict], title: str, keys: list[str]) -> None:
    for key in keys:
        steps, values = metric_series(records, key)
        marker = "o" if key.startswith("eval/") else None
        ax.plot(steps, values, label=key, marker=marker, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
