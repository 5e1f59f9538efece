"""Small helpers the benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from seqrl.compare import Arm, compare, run_name
from seqrl.train.metrics import metric_series, read_metrics


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    """ "mean ± sd" of the values that are not NaN ("-" when none are)."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


QUIET = ["train.checkpoint_every=0", "train.log_samples=0", "log.tensorboard=false"]
"""Overrides of benchmark runs: no checkpoints, sample logs or TensorBoard files."""


def slug(label: str) -> str:
    """A run-directory-safe form of an arm label ("GRPO + replay" → "grpo-replay")."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def run_arms(
    arms: dict[str, list[str]],
    seeds: list[int],
    out: Path,
    common: list[str],
    *,
    jobs: int = 1,
    threads: int = 1,
    metric: str = "eval/greedy_acc",
) -> dict[str, list[list[dict]]]:
    """Every arm for every seed through :func:`seqrl.compare.compare`; {arm: [each seed's rows]}.

    ``common`` are the settings all arms share, ``arms[label]`` those of one arm. Each run is its
    own ``seqrl train`` process (``threads`` threads, ``jobs`` at once), interleaved by seed; a
    finished run is kept and an interrupted one resumed when the script runs again (a run made
    with other settings is refused: give another output directory). compare's own report
    (report.md, curves, commands.sh, resolved configs) lands in ``out`` beside the runs.
    """
    console = Console()
    specs = {label: Arm(slug(label), None, tuple(extra)) for label, extra in arms.items()}
    t0 = time.perf_counter()
    compare(
        list(specs.values()),
        seeds,
        out=out,
        common=common,
        metric=metric,
        jobs=jobs,
        threads=threads,
        echo=lambda line: console.print(f"[{time.perf_counter() - t0:6.0f} s] {line}"),
    )
    return {
        label: [read_metrics(out / "runs" / run_name(arm, seed)) for seed in seeds]
        for label, arm in specs.items()
    }


def markdown_table(
    summaries: dict[str, list[dict[str, float]]],
    columns: list[tuple[str, str]],
    fmt: Callable[[str], str] = lambda key: ".3f",
) -> list[str]:
    """| metric | arm … | rows of mean ± sd over seeds, one per (key, label) in ``columns``."""
    arms = list(summaries)
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for key, label in columns:
        cells = [mean_sd([s[key] for s in summaries[arm]], fmt(key)) for arm in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def seed_curves(ax, runs: list[list[dict]], key: str, color: str, label: str) -> None:
    """One thin line per seed's ``key`` over steps, and their mean (where the steps agree)."""
    curves = [metric_series(rows, key) for rows in runs]
    for steps, values in curves:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
    if curves and curves[0][0] and all(c[0] == curves[0][0] for c in curves):
        steps = curves[0][0]
        mean = [statistics.mean(c[1][i] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, color=color, linewidth=2, label=f"{label} (mean)")


def sweep_tables(
    results: dict[str, list[list[dict]]],
    values: list[float],
    arms: list[str],
    arm_label: Callable[[str, float], str],
    summarise: Callable[[list[dict]], dict[str, float]],
    columns: list[tuple[str, str]],
    heading: Callable[[float], str],
    wide: tuple[str, ...] = ("kl_old", "ratio_min", "ratio_max"),
) -> str:
    """One markdown table per swept value (mean ± sd over seeds, arms as columns)."""
    out = []
    for value in values:
        summaries = {
            arm: [summarise(rows) for rows in results[arm_label(arm, value)]] for arm in arms
        }
        out += ["", heading(value), ""]
        out += markdown_table(summaries, columns, lambda key: ".2g" if key in wide else ".3f")
    return "\n".join(out)


def machine_line(threads: int, jobs: int, seconds: float) -> str:
    """The machine, torch and how the runs shared it, for the foot of a benchmark's output."""
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({threads} thread per run, {jobs} at once); total {seconds:.0f} s"
    )


def rows_mean(rows: list[dict], key: str) -> float:
    """Mean of ``key`` over the metrics rows that log it as a finite number (NaN if none do)."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return statistics.mean(vals) if vals else float("nan")
