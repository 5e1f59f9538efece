"""Runs never mix: exclusive run directories, the run lock, unique default names, --overwrite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqrl.config import load_config
from seqrl.config.schema import default_run_name
from seqrl.train import checkpoint as ckpt
from seqrl.train.rundir import LOCK_NAME, RunDirError, claim_run_dir
from seqrl.train.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another live process that holds ``run_dir``'s lock (a real one, via claim_run_dir)."""
    code = (
        "import sys, time; from seqrl.train.rundir import claim_run_dir; "
        f"run = claim_run_dir(__import__('pathlib').Path({str(run_dir)!r})); "
        "print('locked', flush=True); time.sleep(60)"
    )
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------ claim_run_dir itself
def test_a_new_run_creates_its_directory_and_refuses_one_that_holds_a_run(tmp_path):
    run = claim_run_dir(tmp_path / "a")
    assert run.path == tmp_path / "a" and (tmp_path / "a" / LOCK_NAME).exists()
    (run.path / "config.yaml").write_text("x")
    run.release()

    (tmp_path / "a" / "checkpoints" / "step-4").mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"already exists.*--resume .*a.*--overwrite"):
        claim_run_dir(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoints" / "step-4").is_dir()  # nothing touched


def test_a_live_run_holds_its_directory_against_new_runs_and_resumes(tmp_path):
    holder = _holder(tmp_path / "a")  # the directory exists, with nothing but the lock file
    try:
        for resume in (False, True):  # a second run of that name, a second --resume
            with pytest.raises(RunDirError, match=rf"in use .*pid {holder.pid} "):
                claim_run_dir(tmp_path / "a", resume=resume)
        with pytest.raises(RunDirError, match="in use"):
            claim_run_dir(tmp_path / "a", overwrite=True)
    finally:
        holder.kill()  # SIGKILL: no clean-up at all; the kernel drops the lock
        holder.wait()
    run = claim_run_dir(tmp_path / "a", resume=True)  # a stale lock file does not block
    assert (run.path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    run.release()


def test_default_names_differ_and_a_taken_one_is_replaced(tmp_path, monkeypatch):
    # the 4 random hex digits of 50 names drawn in one second collide with chance ≈ 50²/2¹⁷ ≈ 2%
    # (the claim below draws again then); a seeded stream makes the test deterministic
    import random

    import seqrl.config.schema as schema

    rng = random.Random(0)
    monkeypatch.setattr(schema.secrets, "token_hex", lambda n: rng.randbytes(n).hex())
    names = {default_run_name("gspo") for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("gspo-") for n in names)
    (tmp_path / "gspo-taken").mkdir()
    (tmp_path / "gspo-taken" / "config.yaml").write_text("x")
    fresh = iter(["gspo-taken", "gspo-free"])
    run = claim_run_dir(tmp_path / "gspo-taken", fresh_name=lambda: next(fresh), overwrite=True)
    assert run.path == tmp_path / "gspo-free"  # a clash, then another draw
    assert (tmp_path / "gspo-taken" / "config.yaml").exists()  # never overwritten
    run.release()


def test_overwrite_empties_a_run_directory_but_nothing_else(tmp_path):
    old = tmp_path / "a"
    (old / "checkpoints" / "step-9").mkdir(parents=True)
    (old / "config.yaml").write_text("x")
    run = claim_run_dir(old, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == [LOCK_NAME]
    run.release()
    assert not old.exists()  # nothing was written: the directory is given back

    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match=r"not a seqrl run directory .*no config\.yaml"):
            claim_run_dir(other, overwrite=overwrite)
    assert (other / "thesis.tex").read_text() == "precious"
    with pytest.raises(RunDirError, match="choose one"):
        claim_run_dir(old, overwrite=True, resume=True)


def test_a_directory_left_by_a_run_that_never_started_is_reused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK_NAME).write_text("12345 elsewhere\n")  # killed during its set-up
    run = claim_run_dir(tmp_path / "a")
    assert run.path == tmp_path / "a"
    run.release()


# ------------------------------------------------------------------ through the trainer
def test_releasing_a_run_directory_that_was_deleted_first_is_quiet(tmp_path):
    """A run in a temporary folder that was cleaned up before the interpreter exits."""
    import shutil

    claim = claim_run_dir(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    claim.release()  # nothing to remove, no error
    assert not claim.lock.held and not (tmp_path / "gone").exists()


def test_runs_started_together_get_their_own_directories(fast_overrides, tmp_path):
    unnamed = [o for o in fast_overrides if not o.startswith("name=")]
    cfg = load_config(None, [*unnamed, "train.steps=1"])  # one config: one cached default name
    trainers = [Trainer(cfg, progress=False) for _ in range(3)]
    assert len({t.run_dir for t in trainers}) == 3
    assert all(t.run_dir.parent == tmp_path for t in trainers)
    for t in trainers:
        t.close()
    assert not any(tmp_path.iterdir())  # none of them trained: nothing is left behind


def test_a_finished_run_is_never_mixed_with_a_new_one_of_the_same_name(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=2", "train.checkpoint_every=1"])
    first = Trainer(cfg, progress=False)
    first.fit()
    run = first.run_dir
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    with pytest.raises(RunDirError, match="already exists"):
        Trainer(cfg.with_overrides(["train.steps=1"]), progress=False)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    assert after == before  # its checkpoints, log and final model are untouched

    live = Trainer.resume(run, progress=False)  # holds the lock until it ends
    with pytest.raises(
        RunDirError, match=rf"in use by a running seqrl process \(pid {os.getpid()} "
    ):
        Trainer.resume(run, progress=False)
    live.close()

    again = Trainer(cfg.with_overrides(["train.steps=1"]), progress=False, overwrite=True)
    again.fit()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 1  # the old run's records are gone
    assert [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step-1"]


def test_a_failed_set_up_gives_the_run_directory_back(fast_overrides, tmp_path):
    cfg = load_config(None, [*fast_overrides, "model.policy=/nonexistent/model"])
    with pytest.raises((OSError, ValueError)) as failed:  # (its traceback holds the trainer)
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # the same name can be used at once
    good = Trainer(cfg.with_overrides(["model.policy=builtin:nano"]), progress=False)
    assert good.run_dir == tmp_path / "run" and failed.value is not None
    good.close()


# ------------------------------------------------------------------ leftovers of killed runs
def test_stale_temporary_checkpoints_are_removed_at_resume_and_after_a_save(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=2", "train.checkpoint_every=1"])
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    root = trainer.run_dir / "checkpoints"
    ckpt.remove_temporaries(root)
    stale = root / ".tmp-step-3-4242"  # a save killed before its rename: a full model each
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    Trainer.resume(trainer.run_dir, progress=False).close()
    assert not stale.exists()

    stale.mkdir()
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(root, 5, model, {"x": 1}, keep=0)
    assert not stale.exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
