"""Small helpers the benchmark scripts share (imported as a sibling module)."""

from __future__ import annotations

import statistics


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    """ "mean ± sd" of the values that are not NaN ("-" when none are)."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"
