"""Fair comparisons of RL algorithms: every arm × seed in its own process, one report.

    seqrl compare grpo:preset=grpo sppo:preset=sppo --seeds 0 1 2 --steps 100 --target +0.05

An *arm* is one configuration: a YAML file or a preset name and/or ``key=value`` overrides in
one argument (``"preset=grpo algo.loss.kl_coef=0"``), optionally labelled (``grpo-nokl:...``).
Every arm runs for every seed as its own ``seqrl train`` process (one thread each by default),
interleaved by seed, with the arms' order rotated from seed to seed, so machine load falls on
all arms alike. A run that already finished is kept, an interrupted one resumes from its last
checkpoint: run the same command again to continue an interrupted comparison.

The report directory holds ``report.md`` (a table of mean and 95% interval over seeds per arm),
``summary.json`` (every run's numbers), ``accuracy_vs_step.png`` and
``accuracy_vs_time.png`` (mean over seeds with a band), ``commands.sh`` (the exact commands),
``configs/ARM.yaml`` (each arm's resolved config) and ``runs/`` (the runs themselves). Config
keys that differ between arms are listed at the top of the report, so a comparison that
changes more than the thing being compared is visible.

What is measured, per run (``metric`` is the held-out accuracy, avg@k by default):
    final / best            the last and the highest evaluation
    auc                     mean accuracy over training steps (trapezoid over the evaluations)
    time to target          training time (Σ time/step_s: rollout + update, no evaluation)
                            until the first evaluation at or above the target
    tokens to target        sampled response tokens spent until then
    response length         mean of response_len/mean over the steps
    clip fraction           mean of policy/clip_frac (and policy/seq_clip_frac) over the steps
    peak memory             the run process's peak resident set size (``ru_maxrss`` of its
                            ``os.wait4``; the Python + torch baseline included), the largest
                            over a resumed run's attempts; kept in ``logs/RUN.rusage.json``
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IGNORED_KEYS = ("name", "seed", "output_dir")  # differ between runs by construction
DEFAULT_METRIC = "eval/sampled_acc"
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1 … 30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


class CompareError(ValueError):
    """A comparison that cannot run as asked (bad arm, failed run, nothing to report)."""


@dataclass(frozen=True)
class Arm:
    label: str
    config: str | None  # a YAML file or a preset name; None = the default config
    overrides: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, index: int = 0) -> Arm:
        """``[LABEL:]SPEC``; SPEC = at most one YAML path / preset name, then ``key=value``s."""
        label = None
        head, sep, rest = text.partition(":")
        if sep and head and "=" not in head and " " not in head and not Path(head).exists():
            label, text = head, rest
        tokens = shlex.split(text)
        configs = [t for t in tokens if "=" not in t]
        overrides = tuple(t for t in tokens if "=" in t)
        if len(configs) > 1:
            raise CompareError(
                f"arm {text!r} names {len(configs)} configs ({', '.join(configs)}); give one "
                "YAML file or preset and then key=value overrides"
            )
        config = configs[0] if configs else None
        if label is None:
            presets = [o.split("=", 1)[1] for o in overrides if o.startswith("preset=")]
            label = Path(config).stem if config else (presets[-1] if presets else f"arm{index}")
        return cls(label, config, overrides)


@dataclass
class RunSummary:
    arm: str
    seed: int
    final: float
    best: float
    start: float
    auc: float
    time_to_target: float | None  # None: the target was never reached
    tokens_to_target: float | None
    train_time_s: float
    response_len: float
    clip_frac: float
    seq_clip_frac: float | None
    steps: int
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, time, acc)
    peak_rss_mib: float | None = None  # the run process's peak RSS; None: not recorded


@dataclass
class CompareReport:
    out: Path
    runs: list[RunSummary]
    config_diff: dict[str, dict[str, object]]  # key → {arm: value} where the arms differ
    files: list[Path]


# ------------------------------------------------------------------ running


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.label}-seed{seed}"


def train_command(
    arm: Arm, seed: int, out: Path, common: Sequence[str], *, resume: bool = False
) -> list[str]:
    """The ``seqrl train`` command of one run (or its ``--resume``)."""
    base = [sys.executable, "-m", "seqrl", "train"]
    if resume:
        return [*base, "--resume", str(out / "runs" / run_name(arm, seed)), "--no-progress"]
    sets = [*arm.overrides, *common, *run_settings(arm, seed, out)]
    config = [arm.config] if arm.config else []
    return [*base, *config, *(f"--set={s}" for s in sets), "--no-progress"]


def schedule(arms: Sequence[Arm], seeds: Sequence[int]) -> list[tuple[Arm, int]]:
    """Seed-major order with the arms rotated by one per seed: no arm always runs first."""
    order = []
    for i, seed in enumerate(seeds):
        k = i % len(arms)
        order += [(arm, seed) for arm in [*arms[k:], *arms[:k]]]
    return order


def _finished(run_dir: Path) -> bool:
    return (run_dir / "final" / "config.json").exists()


def _check_same_settings(arm: Arm, seed: int, out: Path, common: Sequence[str]) -> None:
    """Refuse to keep or resume a run made with other settings (an earlier comparison in ``out``)."""
    run_dir = out / "runs" / run_name(arm, seed)
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    from seqrl.config import ConfigError, load_config

    sets = [*arm.overrides, *common, *run_settings(arm, seed, out)]
    expected = load_config(arm.config, sets).model_dump(mode="json")
    try:
        found = load_config(str(saved)).model_dump(mode="json")
    except ConfigError as err:
        raise CompareError(
            f"{saved} is not a readable run config ({err}); delete {run_dir}"
        ) from err
    changed = config_diff({"there": found, "now": expected}, ignored=())  # the run's place too
    if changed:
        shown = ", ".join(
            f"{k}: {v['there']!r} there, {v['now']!r} now" for k, v in list(changed.items())[:5]
        )
        raise CompareError(
            f"{run_dir} was made with other settings ({shown}{', …' if len(changed) > 5 else ''}); "
            f"give this comparison another --out, or delete {run_dir} to run it again"
        )


def run_settings(arm: Arm, seed: int, out: Path) -> list[str]:
    """The overrides that place one run: its seed, name and directory."""
    return [f"seed={seed}", f"name={run_name(arm, seed)}", f"output_dir={out / 'runs'}"]


def _run_one(arm: Arm, seed: int, out: Path, common: Sequence[str], threads: int, echo) -> None:
    """Run (or resume, or skip) one arm × seed; raises CompareError if the run fails."""
    run_dir = out / "runs" / run_name(arm, seed)
    _check_same_settings(arm, seed, out, common)
    if _finished(run_dir):
        echo(f"{run_dir.name}: finished earlier, kept")
        return
    has_checkpoint = any((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    if run_dir.exists() and not has_checkpoint:
        shutil.rmtree(run_dir)  # started but saved nothing: start it again
    cmd = train_command(arm, seed, out, common, resume=has_checkpoint)
    echo(("resuming " if has_checkpoint else "running ") + run_dir.name)
    log = out / "logs" / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code, peak = run_logged(cmd, log, env)
    _record_peak_rss(_rusage_path(out, run_dir.name), peak)  # a failed attempt's too
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise CompareError(
            f"{run_dir.name} failed (exit {code}); its log is {log}:\n{tail}\n"
            "fix the cause and run the same `seqrl compare` command again to continue"
        )


def run_logged(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> tuple[int, float]:
    """Run ``cmd`` with its stdout and stderr appended to ``log``: (exit code, peak RSS in MiB).

    The exit code is ``subprocess``'s (−N: killed by signal N). The peak resident set size is the
    child's ``ru_maxrss`` from ``os.wait4`` on its pid (its own process, and any of its children
    it waited for), so several threads can each wait for their own run at once.
    """
    with open(log, "a") as f:
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted (Ctrl-C reaches the child too): let it stop
            try:  # cleanly, as `seqrl train` does on SIGINT, then make sure it has ended
                proc.wait(timeout=30)
            except BaseException:
                proc.kill()
                proc.wait()
            raise
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
    kib = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS
    return code, kib / 1024


def _rusage_path(out: Path, name: str) -> Path:
    return out / "logs" / f"{name}.rusage.json"


def _record_peak_rss(path: Path, mib: float) -> None:
    """Write ``{"peak_rss_mib": ...}``, the largest of ``mib`` and what an earlier attempt wrote."""
    earlier = read_peak_rss(path)
    if earlier is not None:
        mib = max(mib, earlier)
    path.write_text(json.dumps({"peak_rss_mib": mib}) + "\n")


def read_peak_rss(path: Path) -> float | None:
    """The peak RSS (MiB) in a ``RUN.rusage.json``; None if it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())["peak_rss_mib"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


# ------------------------------------------------------------------ configs


def resolved_configs(arms: Sequence[Arm], common: Sequence[str]) -> dict[str, dict]:
    """Each arm's fully resolved config as a plain mapping (validates every arm up front).

    ``algo.loss`` (the overrides of the loss preset) is replaced by the loss the run computes,
    ``algo.loss.<field>`` for every field of :class:`seqrl.core.PolicyLossConfig`.
    """
    import dataclasses

    from seqrl.config import load_config

    out = {}
    for arm in arms:
        cfg = load_config(arm.config, [*arm.overrides, *common])
        data = cfg.model_dump(mode="json")
        data["algo"]["loss"] = dataclasses.asdict(cfg.resolved_loss())
        out[arm.label] = data
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(
    configs: dict[str, dict], ignored: Sequence[str] = IGNORED_KEYS
) -> dict[str, dict[str, object]]:
    """{dotted key: {arm: value}} for every key not in ``ignored`` whose value is not the same
    in all arms."""
    flat = {arm: _flatten(c) for arm, c in configs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values())))
    diff = {}
    for key in keys:
        if key in ignored:
            continue
        values = {arm: f.get(key) for arm, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            diff[key] = values
    return diff


# ------------------------------------------------------------------ measuring


def summarize_run(arm: str, seed: int, records: list[dict], metric: str, target) -> RunSummary:
    """The numbers of one run from its metrics.jsonl records (see the module docstring).

    ``target``: an absolute accuracy (0.8), a gain over the run's first evaluation ("+0.05"),
    or None.
    """
    steps = [r for r in records if "time/step_s" in r]
    evals = [r for r in records if isinstance(r.get(metric), (int, float))]
    if not evals:
        raise CompareError(f"{arm} seed {seed}: no evaluation logged {metric!r}")
    elapsed, tokens = {0: 0.0}, {0: 0.0}  # step → cumulative training time / sampled tokens
    t = n = 0.0
    for r in steps:
        t += r["time/step_s"]
        n += r.get("throughput/tokens_per_s", 0.0) * r["time/step_s"]
        elapsed[r["step"]], tokens[r["step"]] = t, n
    curve = [(r["step"], elapsed.get(r["step"], t), r[metric]) for r in evals]
    accs = [c[2] for c in curve]
    goal = _goal(target, accs[0])
    hit = next((c for c in curve if goal is not None and c[2] >= goal), None)
    clip = [r["policy/clip_frac"] for r in steps if "policy/clip_frac" in r]
    seq_clip = [r["policy/seq_clip_frac"] for r in steps if "policy/seq_clip_frac" in r]
    lengths = [r["response_len/mean"] for r in steps if "response_len/mean" in r]
    return RunSummary(
        arm=arm,
        seed=seed,
        final=accs[-1],
        best=max(accs),
        start=accs[0],
        auc=_auc([c[0] for c in curve], accs),
        time_to_target=None if hit is None else hit[1],
        tokens_to_target=None if hit is None else tokens.get(hit[0], n),
        train_time_s=t,
        response_len=_mean(lengths),
        clip_frac=_mean(clip),
        seq_clip_frac=_mean(seq_clip) if seq_clip else None,
        steps=steps[-1]["step"] if steps else 0,
        curve=curve,
    )


def _goal(target, start: float) -> float | None:
    if target is None:
        return None
    text = str(target).strip()
    if text.startswith("+"):
        return start + float(text[1:])
    return float(text)


def _auc(xs: list[int], ys: list[float]) -> float:
    """Mean of y over x by the trapezoid rule (y itself for a single point)."""
    if len(xs) < 2 or xs[-1] == xs[0]:
        return ys[-1]
    area = sum(
        (x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False)
    )
    return area / (xs[-1] - xs[0])


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval) over seeds; (nan, nan) if empty."""
    values = [v for v in values if v is not None and v == v]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


# ------------------------------------------------------------------ reporting


ROWS = [  # (RunSummary field, label, format)
    ("final", "final accuracy", ".3f"),
    ("best", "best accuracy", ".3f"),
    ("auc", "mean accuracy over training (AUC)", ".3f"),
    ("time_to_target", "training time to target (s)", ".1f"),
    ("tokens_to_target", "rollout tokens to target", ".0f"),
    ("train_time_s", "training time (s)", ".1f"),
    ("response_len", "mean response length", ".2f"),
    ("clip_frac", "clip fraction", ".4f"),
    ("seq_clip_frac", "sequence clip fraction", ".4f"),
    ("peak_rss_mib", "peak memory per run (MiB)", ".0f"),
]


def markdown_report(
    runs: list[RunSummary], arms: Sequence[str], diff: dict, metric: str, target
) -> str:
    lines = [f"# seqrl compare: {', '.join(arms)}", ""]
    seeds = sorted({r.seed for r in runs})
    lines.append(
        f"Seeds {', '.join(map(str, seeds))}; accuracy = `{metric}`; target = {target or 'none'}. "
        "Cells: mean ± half-width of the 95% t-interval over seeds."
    )
    lines.append("")
    if diff:
        lines.append("**Config keys that differ between arms** (check each is intended):")
        lines.append("")
        for key, values in diff.items():
            cells = ", ".join(f"{arm}: `{json.dumps(v)}`" for arm, v in values.items())
            lines.append(f"- `{key}`: {cells}")
        lines.append("")
    lines += ["| | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for key, label, fmt in ROWS:
        cells = []
        for arm in arms:
            values = [getattr(r, key) for r in runs if r.arm == arm]
            if key.endswith("to_target"):
                reached = [v for v in values if v is not None]
                mean, half = mean_ci(reached)
                cell = _cell(mean, half, fmt) + f" ({len(reached)}/{len(values)} reached)"
            else:
                cell = _cell(*mean_ci(values), fmt)
            cells.append(cell)
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(mean: float, half: float, fmt: str) -> str:
    if mean != mean:
        return "-"
    return f"{mean:{fmt}}" + ("" if half != half else f" ± {half:{fmt}}")


def plot_curves(runs: list[RunSummary], arms: Sequence[str], out: Path, metric: str) -> list[Path]:
    """Accuracy vs step and vs training time: mean over seeds, band = min … max of the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, name, xlabel in ((0, "accuracy_vs_step.png", "step"),
                               (1, "accuracy_vs_time.png", "training time (s)")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for arm in arms:
            curves = [r.curve for r in runs if r.arm == arm]
            grid, rows = _common_grid(curves, axis)
            if not grid:
                continue
            mean = [statistics.fmean(col) for col in zip(*rows, strict=True)]
            (line,) = ax.plot(grid, mean, label=f"{arm} (n={len(rows)})")
            if len(rows) > 1:
                lo = [min(col) for col in zip(*rows, strict=True)]
                hi = [max(col) for col in zip(*rows, strict=True)]
                ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _common_grid(curves: list[list[tuple]], axis: int) -> tuple[list[float], list[list[float]]]:
    """Each seed's accuracy at the x values of the first seed (steps), or on a shared time grid
    up to the shortest run (linear interpolation between evaluations)."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    if axis == 0:
        grid = [p[0] for p in curves[0]]
        return grid, [[_interp(c, 0, x) for x in grid] for c in curves]
    end = min(c[-1][1] for c in curves)
    grid = [end * i / 50 for i in range(51)]
    return grid, [[_interp(c, 1, x) for x in grid] for c in curves]


def _interp(curve: list[tuple], axis: int, x: float) -> float:
    xs, ys = [p[axis] for p in curve], [p[2] for p in curve]
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


# ------------------------------------------------------------------ the whole comparison


def compare(
    arms: Sequence[Arm | str],
    seeds: Sequence[int],
    *,
    out: str | Path,
    steps: int | None = None,
    wall_clock: float | None = None,
    target: float | str | None = None,
    common: Sequence[str] = (),
    metric: str = DEFAULT_METRIC,
    threads: int = 1,
    jobs: int = 1,
    echo=print,
) -> CompareReport:
    """Run every arm for every seed (each its own process) and write the report; see the module
    docstring. ``common`` are ``key=value`` overrides every arm gets; ``steps`` and
    ``wall_clock`` (a training-time budget in seconds, ``train.time_limit_s``) set the length.
    ``jobs`` runs that many at once, in the same interleaved order (``jobs`` × ``threads`` at
    most the CPU cores; times then include the neighbours' contention, alike for every arm).
    """
    if jobs < 1 or threads < 1:
        raise CompareError(f"jobs and threads must be at least 1, got {jobs} and {threads}")
    arms = [a if isinstance(a, Arm) else Arm.parse(a, i) for i, a in enumerate(arms)]
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise CompareError(f"two arms share a label ({', '.join(labels)}); name them LABEL:SPEC")
    if not arms or not seeds:
        raise CompareError("give at least one arm and one seed")
    common = list(common)
    if steps is not None:
        common.append(f"train.steps={steps}")
    if wall_clock is not None:
        common.append(f"train.time_limit_s={wall_clock}")
        if steps is None:
            common.append("train.steps=1000000")  # the time budget ends the run
    out = Path(out)
    configs = resolved_configs(arms, common)  # every arm validated before anything runs
    diff = config_diff(configs)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    files = _write_inputs(arms, seeds, out, common, configs)
    if len(diff) > 1:
        echo(f"warning: the arms differ in {len(diff)} config keys: {', '.join(diff)}")
    _run_all(schedule(arms, seeds), out, common, threads, jobs, echo)
    from seqrl.train.metrics import read_metrics

    runs = []
    for arm in arms:
        for seed in seeds:
            name = run_name(arm, seed)
            run = summarize_run(arm.label, seed, read_metrics(out / "runs" / name), metric, target)
            run.peak_rss_mib = read_peak_rss(_rusage_path(out, name))
            runs.append(run)
    report = out / "report.md"
    report.write_text(markdown_report(runs, labels, diff, metric, target))
    summary = out / "summary.json"
    summary.write_text(json.dumps([vars(r) for r in runs], indent=1))
    files += [report, summary, *plot_curves(runs, labels, out, metric)]
    return CompareReport(out, runs, diff, files)


def _run_all(order, out: Path, common, threads: int, jobs: int, echo) -> None:
    """Every (arm, seed) of ``order``, ``jobs`` at a time; the first failure is raised after the
    runs already started have ended (what finished is kept for the next try)."""
    if jobs == 1:
        for arm, seed in order:
            _run_one(arm, seed, out, common, threads, echo)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:  # each thread waits on its run's process
        futures = [pool.submit(_run_one, a, s, out, common, threads, echo) for a, s in order]
        errors = []
        for future in futures:
            try:
                future.result()
            except CompareError as err:
                errors.append(err)
                for later in futures:
                    later.cancel()  # not yet started: left for the next try
    if errors:
        raise errors[0]


def _write_inputs(arms, seeds, out: Path, common, configs: dict[str, dict]) -> list[Path]:
    """commands.sh (what runs) and configs/ARM.yaml (each arm resolved)."""
    import yaml

    paths = []
    for label, cfg in configs.items():
        path = out / "configs" / f"{label}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(path)
    lines = ["#!/usr/bin/env bash", "# each run of this comparison, in the order they run", ""]
    lines += [shlex.join(train_command(a, s, out, common)) for a, s in schedule(arms, seeds)]
    path = out / "commands.sh"
    path.write_text("\n".join(lines) + "\n")
    return [*paths, path]
