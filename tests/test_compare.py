"""`seqrl compare`: arms, schedule, per-run numbers, intervals, config diffs, the whole command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from scipy import stats

from seqrl.compare import (
    Arm,
    CompareError,
    _check_same_settings,
    config_diff,
    mean_ci,
    resolved_configs,
    run_logged,
    schedule,
    summarize_run,
)
from seqrl.config import load_config
from seqrl.train.trainer import Trainer

COMMON = [
    "model.policy=builtin:nano",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.eval_size=8",
    "train.eval_every=1",
    "train.eval_samples=2",
    "train.checkpoint_every=1",
    "log.tensorboard=false",
]


def test_arms_parse_label_config_and_overrides(tmp_path):
    assert Arm.parse("grpo:preset=grpo algo.loss.kl_coef=0") == Arm(
        "grpo", None, ("preset=grpo", "algo.loss.kl_coef=0")
    )
    assert Arm.parse("preset=sppo rollout.group_size=1") == Arm(
        "sppo", None, ("preset=sppo", "rollout.group_size=1")
    )
    assert Arm.parse("dapo").label == "dapo" and Arm.parse("dapo").config == "dapo"
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("preset: grpo\n")
    assert Arm.parse(f"{yaml} optim.lr=1e-5") == Arm("mine", str(yaml), ("optim.lr=1e-5",))
    assert Arm.parse("optim.lr=1e-5", 3).label == "arm3"
    with pytest.raises(CompareError, match="names 2 configs"):
        Arm.parse("grpo dapo")


def test_schedule_is_seed_major_and_rotates_the_arms():
    a, b, c = (Arm(x, None) for x in "abc")
    order = [(arm.label, seed) for arm, seed in schedule([a, b, c], [0, 1, 2, 3])]
    assert order == [
        ("a", 0), ("b", 0), ("c", 0),
        ("b", 1), ("c", 1), ("a", 1),
        ("c", 2), ("a", 2), ("b", 2),
        ("a", 3), ("b", 3), ("c", 3),
    ]  # fmt: skip


def _records():
    """Steps of 2 s and 100 tokens each, evaluations at steps 0, 2, 4."""
    rows = [{"step": 0, "eval/sampled_acc": 0.50}]
    for step in range(1, 5):
        rows.append(
            {
                "step": step,
                "time/step_s": 2.0,
                "throughput/tokens_per_s": 50.0,
                "response_len/mean": float(step),
                "policy/clip_frac": 0.1 * step,
            }
        )
        if step % 2 == 0:
            rows.append({"step": step, "eval/sampled_acc": {2: 0.58, 4: 0.54}[step]})
    return rows


def test_a_runs_numbers_from_its_metrics():
    r = summarize_run("a", 0, _records(), "eval/sampled_acc", "+0.05")
    assert (r.start, r.final, r.best) == (0.50, 0.54, 0.58)
    assert r.time_to_target == 4.0 and r.tokens_to_target == 200.0  # first eval ≥ 0.55: step 2
    assert r.train_time_s == 8.0 and r.steps == 4
    # trapezoid over steps 0-2-4: (0.5 + 0.58)/2 · 2 + (0.58 + 0.54)/2 · 2, over 4 steps
    assert r.auc == pytest.approx(((0.50 + 0.58) + (0.58 + 0.54)) / 4)
    assert r.response_len == 2.5 and r.clip_frac == pytest.approx(0.25)
    assert summarize_run("a", 0, _records(), "eval/sampled_acc", 0.9).time_to_target is None
    assert summarize_run("a", 0, _records(), "eval/sampled_acc", "0.52").time_to_target == 4.0
    with pytest.raises(CompareError, match="no evaluation"):
        summarize_run("a", 0, _records(), "eval/greedy_acc", None)


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
def test_interval_is_the_student_t_interval(n):
    values = [math.sin(i) for i in range(n)]
    mean, half = mean_ci(values)
    sem = stats.sem(values)
    t = stats.t.ppf(0.975, n - 1) if n <= 31 else 1.96
    assert mean == pytest.approx(sum(values) / n)
    assert half == pytest.approx(t * sem, rel=1e-3)
    assert math.isnan(mean_ci([0.3])[1]) and math.isnan(mean_ci([])[0])


def test_config_diff_names_every_key_beyond_the_compared_one():
    configs = resolved_configs(
        [Arm.parse("a:preset=grpo"), Arm.parse("b:preset=grpo optim.lr=3e-5 seed=4")], []
    )
    assert config_diff(configs) == {"optim.lr": {"a": 2e-5, "b": 3e-5}}  # the seed is ignored
    configs = resolved_configs([Arm.parse("a:preset=grpo"), Arm.parse("b:preset=gspo")], [])
    diff = config_diff(configs)  # the loss the run computes, not the preset's overrides
    assert diff["algo.loss.ratio_level"] == {"a": "token", "b": "sequence"}
    assert diff["algo.loss.kl_coef"] == {"a": 0.04, "b": 0.0}


def test_a_training_time_budget_ends_the_run_early(tmp_path):
    cfg = load_config(
        None,
        [*COMMON, "train.steps=50", "train.time_limit_s=1e-9", f"output_dir={tmp_path}", "name=t"],
    )
    trainer = Trainer(cfg, progress=False)
    summary = trainer.fit()
    assert summary["steps"] == 1  # the first step crosses any positive budget
    assert trainer.state.train_time_s > 0
    assert 1 in trainer.state.evals  # evaluated where it stopped


def test_a_run_is_logged_with_its_exit_code_and_peak_memory(tmp_path):
    log = tmp_path / "run.log"
    big = "x = bytearray(200 * 2**20); print('ok')"  # 200 MiB, touched (zero-filled)
    code, peak_mib = run_logged([sys.executable, "-c", big], log)
    assert code == 0 and "ok" in log.read_text()
    assert peak_mib >= 200
    fail = "import sys; print('bye', file=sys.stderr); sys.exit(3)"
    code, _ = run_logged([sys.executable, "-c", fail], log)
    assert code == 3
    assert log.read_text().splitlines() == ["ok", "bye"]  # appended, stderr too


@pytest.mark.slow
def test_compare_command_writes_a_report_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "seqrl", "compare", "a:preset=grpo", "b:preset=gspo",
           "--seeds", "0", "1", "--steps", "2", "--target", "+0.01", "--out", str(out),
           *(f"--set={c}" for c in COMMON)]  # fmt: skip
    first = subprocess.run([*cmd, "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warning: the arms differ in" in first.stdout and "algo.loss.ratio_level" in first.stdout
    report = (out / "report.md").read_text()
    assert "| final accuracy |" in report and "| a | b |" in report
    assert "| peak memory per run (MiB) |" in report
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["peak_rss_mib"] > 0 for r in summary)
    assert sorted((r["arm"], r["seed"]) for r in summary) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1)
    ]  # fmt: skip
    for name in ("accuracy_vs_step.png", "accuracy_vs_time.png", "commands.sh"):
        assert (out / name).stat().st_size > 0
    assert (out / "configs" / "b.yaml").exists()

    # interrupted: one run lost its final/ and its last checkpoint, another everything
    import shutil

    shutil.rmtree(out / "runs" / "b-seed1" / "final")
    shutil.rmtree(out / "runs" / "b-seed1" / "checkpoints" / "step-2")
    shutil.rmtree(out / "runs" / "a-seed0")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a-seed1: finished earlier, kept" in again.stdout
    assert "resuming b-seed1" in again.stdout and "running a-seed0" in again.stdout
    rerun = json.loads((out / "summary.json").read_text())
    assert {(r["arm"], r["seed"]): r["final"] for r in rerun} == {
        (r["arm"], r["seed"]): r["final"] for r in summary
    }  # the resumed and rerun runs reach what they reached the first time


def test_compare_refuses_a_bad_arm_before_running_anything(tmp_path):
    from typer.testing import CliRunner

    from seqrl.cli import app

    result = CliRunner().invoke(
        app, ["compare", "a:preset=grpo rollout.group_sise=2", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 2
    assert "rollout.group_size" in result.output  # the config error, with its hint
    assert not (tmp_path / "c" / "runs").exists()


def test_a_run_made_with_other_settings_is_neither_kept_nor_resumed(tmp_path):
    arm = Arm.parse("a:preset=grpo")
    run_dir = tmp_path / "runs" / "a-seed0"
    run_dir.mkdir(parents=True)
    placed = ["seed=0", "name=a-seed0", f"output_dir={tmp_path / 'runs'}"]
    same = load_config(None, ["preset=grpo", *COMMON, *placed])
    (run_dir / "config.yaml").write_text(same.to_yaml())
    _check_same_settings(arm, 0, tmp_path, COMMON)  # the same settings: kept
    other = load_config(None, ["preset=grpo", *COMMON, *placed, "optim.lr=1e-3"])
    (run_dir / "config.yaml").write_text(other.to_yaml())
    with pytest.raises(CompareError, match=r"optim.lr: 0.001 there, 2e-05 now.*another --out"):
        _check_same_settings(arm, 0, tmp_path, COMMON)
