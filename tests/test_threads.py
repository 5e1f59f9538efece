"""CPU threads: the default follows the cores this process may use, every command takes
--threads and says at start-up how many it uses."""

import os

import pytest
import torch
from typer.testing import CliRunner

from seqrl import threads as T
from seqrl.cli import app


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_omp_num_threads_else_the_available_cores_capped(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.default_threads() == (3, "from OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert T.default_threads()[0] == min(2, T._cgroup_quota() or 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(T, "_cgroup_quota", lambda: None)
    assert T.default_threads() == (8, "64 cores available, capped at 8")
    monkeypatch.setattr(T, "_cgroup_quota", lambda: 4)  # a container allowed 4 CPUs of 64
    assert T.default_threads() == (4, "all 4 available cores")


def test_cgroup_quota_is_read_in_whole_cores(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(T, "_CGROUP_V2", cpu_max)
    for text, cores in [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1)]:
        cpu_max.write_text(text + "\n")
        assert T._cgroup_quota() == cores


def test_set_threads_sets_torch_and_refuses_zero(restore_threads):
    assert T.set_threads(1)[0] == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="at least 1"):
        T.set_threads(0)


def test_every_computing_command_takes_threads_and_prints_it(tmp_path, restore_threads):
    text = tmp_path / "t.txt"
    text.write_text("one two three\n")
    done = CliRunner().invoke(
        app, ["make-model", str(tmp_path / "m"), "--text", str(text), "--threads", "1"]
    )
    assert done.exit_code == 0, done.output
    assert "threads: 1 (set; " in done.output and torch.get_num_threads() == 1
    for command in ("train", "sft", "eval", "make-model"):
        assert "--threads" in CliRunner().invoke(app, [command, "--help"]).output
    assert "--threads" in CliRunner().invoke(app, ["diagnose", "tail-effect", "--help"]).output
