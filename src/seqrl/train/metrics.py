"""Metric logging: metrics.jsonl (+ TensorBoard when installed), samples.jsonl; rank 0 only."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch


def extreme_kind(key: str) -> str | None:
    """ "max" / "min" for metrics that are extremes (``*_max`` / ``*_min``), else None (a mean)."""
    if key.endswith("_max"):
        return "max"
    if key.endswith("_min"):
        return "min"
    return None


class MetricAccumulator:
    """Collect per-micro-batch metric tensors during a step; one ``.item()`` pass at the end.

    Metrics are averaged over micro-batches, except extremes (``*_max`` / ``*_min``, e.g.
    ``policy/ratio_max``), which keep the largest / smallest value seen.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().double()
            if key not in self._sums:
                self._sums[key] = value
            elif (kind := extreme_kind(key)) is not None:
                pick = torch.maximum if kind == "max" else torch.minimum
                self._sums[key] = pick(self._sums[key], value)
            else:
                self._sums[key] = self._sums[key] + value
            self._counts[key] += 1

    def sums(self) -> dict[str, tuple[float, int]]:
        """{key: (sum, count)}, for averaging over ranks (:func:`seqrl.train.dist.reduce_sums`).

        For extremes the first element is the extreme itself.
        """
        return {k: (v.item(), self._counts[k]) for k, v in self._sums.items()}

    def means(self) -> dict[str, float]:
        return {
            k: (v if extreme_kind(k) else v / self._counts[k]).item() for k, v in self._sums.items()
        }


def quantiles(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """{prefix/min, q25, mean, median, q75, max} of a 1-d tensor."""
    v = values.double()
    if v.numel() == 0:
        return {}
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {
        f"{prefix}/min": v.min().item(),
        f"{prefix}/q25": q[0].item(),
        f"{prefix}/mean": v.mean().item(),
        f"{prefix}/median": q[1].item(),
        f"{prefix}/q75": q[2].item(),
        f"{prefix}/max": v.max().item(),
    }


def _clean(value):
    """JSON has no NaN/inf: write them as strings so a bad step stays visible and parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Writes one JSON object per step to metrics.jsonl, a few samples to samples.jsonl."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: str | bool = "auto"):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError:
                if tensorboard is True:
                    raise ImportError(
                        "log.tensorboard is true but tensorboard is not installed; "
                        "pip install 'seqrl[tensorboard]' or set log.tensorboard=auto"
                    ) from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """([(line, record), ...], torn) of a log written one JSON object per line.

    A last line that does not parse is the record a killed process was writing: it is left out
    and ``torn`` is True. Any other line that does not parse is an edit or a corruption, not an
    interruption: ValueError naming the file and line.
    """
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    rows = []
    for i, raw in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == len(lines) - 1:
                return rows, True
            raise ValueError(
                f"{path}, record {i + 1} of {len(lines)} is not a valid log line ({err}); only a "
                f"torn last line (a run killed while writing it) is dropped automatically: fix or "
                f"delete that line, then try again"
            ) from err
        rows.append((raw.decode("utf-8"), record))
    return rows, False


def truncate_jsonl(path: Path, last_step: int) -> bool:
    """Drop records after ``last_step`` (used on resume, so no step is logged twice).

    A torn last line is dropped too (see :func:`read_jsonl`); returns whether there was one.
    """
    if not path.exists():
        return False
    rows, torn = read_jsonl(path)
    kept = [line for line, record in rows if record["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return torn


def metric_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have it as a number."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a live run's half-written last line left out)."""
    return [record for _, record in read_jsonl(Path(run_dir) / "metrics.jsonl")[0]]
