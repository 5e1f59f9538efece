"""Small helpers the benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from seqrl.config import load_config
from seqrl.train.metrics import read_metrics
from seqrl.train.trainer import Trainer


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    """ "mean ± sd" of the values that are not NaN ("-" when none are)."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def run_arms(
    arms: dict[str, list[str]],
    seeds: list[int],
    out: Path,
    overrides: Callable[[int, str], list[str]],
    run_name: Callable[[str, int], str],
) -> dict[str, list[list[dict]]]:
    """Train every arm for every seed (seed-major); {arm: [metrics rows of each seed's run]}.

    ``overrides(seed, name)`` are the settings all arms share, ``arms[arm]`` those of one arm.
    """
    console = Console()
    results: dict[str, list[list[dict]]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, extra in arms.items():
            name = run_name(arm, seed)
            shutil.rmtree(out / name, ignore_errors=True)
            cfg = load_config(None, [*overrides(seed, name), *extra])
            t0 = time.perf_counter()
            Trainer(cfg, progress=False, console=Console(quiet=True)).fit()
            results[arm].append(read_metrics(out / name))
            console.print(f"{name}: {time.perf_counter() - t0:.0f} s")
    return results


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
