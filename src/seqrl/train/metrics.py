"""Metric logging, rank 0 only: metrics.jsonl, samples.jsonl, and the trackers a run asks for:
TensorBoard (when installed), Weights & Biases (``log.wandb``) and MLflow (``log.mlflow``).

Every tracker gets every finite metric of every step under its seqrl name (MLflow, which
refuses ``@``, gets ``eval/pass_at_4`` for ``eval/pass@4``). A resumed run continues the same
wandb and MLflow runs: their ids are kept in ``trackers.json`` in the run directory.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

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
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=v.device))
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


class TrackerError(RuntimeError):
    """A tracker (wandb, MLflow) that is not installed or could not start its run."""


class Tracker(Protocol):
    """An experiment tracker a :class:`RunLogger` forwards every step's metrics to."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


TRACKER_IDS = "trackers.json"
"""File in the run directory holding the wandb / MLflow run ids, so a resume continues them."""


def _tracker_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / TRACKER_IDS
    return json.loads(path.read_text()) if path.exists() else {}


def _save_tracker_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = _tracker_ids(run_dir) | {name: run_id}
    (run_dir / TRACKER_IDS).write_text(json.dumps(ids, indent=1) + "\n")


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class WandbTracker:
    """A Weights & Biases run (``log.wandb``); ``WANDB_MODE=offline`` writes it to files only."""

    def __init__(
        self, run_dir: Path, *, project: str, entity: str | None, name: str, config: dict
    ) -> None:
        import wandb

        run_id = _tracker_ids(run_dir).get("wandb") or secrets.token_hex(4)  # wandb: 8 of [a-z0-9]
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            id=run_id,
            resume="allow",  # a resumed seqrl run continues its wandb run
            dir=str(run_dir),
            config=config,
        )
        _save_tracker_id(run_dir, "wandb", run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(_finite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^\w\-. /:]")


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts: ``@`` → ``_at_``, other refused characters → ``_``."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


def flat_params(data: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted ``{"algo.loss.clip_low": "0.0003", ...}`` strings."""
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class MlflowTracker:
    """An MLflow run (``log.mlflow``) through ``MlflowClient``: it leaves the caller's own active
    MLflow run alone. The config is logged as dotted params on the run's first start."""

    def __init__(
        self, run_dir: Path, *, tracking_uri: str | None, experiment: str, name: str, config: dict
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        run_id = _tracker_ids(run_dir).get("mlflow")
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(
                exp_id, run_name=name, tags={"seqrl.run_dir": str(run_dir)}
            )
            run_id = run.info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[i : i + 100])
            _save_tracker_id(run_dir, "mlflow", run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in _finite(metrics).items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(
    run_dir: Path,
    *,
    name: str,
    config: dict,
    wandb: Mapping[str, Any] | None = None,
    mlflow: Mapping[str, Any] | None = None,
) -> list[Tracker]:
    """The wandb and MLflow trackers asked for (keyword arguments of their classes, or None).

    Raises :class:`TrackerError` naming the extra to install when a package is missing, or
    what failed when the tracker could not start its run (a bad URI, no credentials, ...).
    """
    trackers: list[Tracker] = []
    for key, settings, cls in (("wandb", wandb, WandbTracker), ("mlflow", mlflow, MlflowTracker)):
        if settings is None:
            continue
        try:
            trackers.append(cls(run_dir, name=name, config=config, **settings))
        except Exception as err:  # close what was opened, then one clear message
            for t in trackers:
                t.close()
            if isinstance(err, ImportError):
                raise TrackerError(
                    f"log.{key} is true but {key} is not installed; pip install 'seqrl[{key}]' "
                    f"or set log.{key}=false"
                ) from None
            detail = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
            raise TrackerError(
                f"log.{key}: could not start the {key} run ({type(err).__name__}: {detail}); "
                f"check the log.{key}_* settings and credentials, or set log.{key}=false"
            ) from None
    return trackers


class RunLogger:
    """Writes one JSON object per step to metrics.jsonl, a few samples to samples.jsonl, and
    forwards the metrics to TensorBoard and the ``trackers`` (wandb, MLflow)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        tensorboard: str | bool = "auto",
        trackers: Sequence[Tracker] = (),
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.trackers = list(trackers) if enabled else []
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
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


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
