"""Runs that are stopped survive it: SIGINT / SIGTERM save a checkpoint and exit, a torn log line
is dropped on resume, and a failed write (read-only directory, full disk) says what failed and
which checkpoint is intact."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqrl.config import load_config
from seqrl.train import checkpoint as ckpt
from seqrl.train.metrics import read_metrics, truncate_jsonl
from seqrl.train.shutdown import StopRequest
from seqrl.train.trainer import Trainer, TrainingAbortedError, TrainingInterruptedError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if "reward/mean" in r]


# ------------------------------------------------------------------ signals, in this process
def test_stop_request_records_the_first_signal_and_hands_on_the_second():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and seen == []  # only recorded
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]  # the second reached the handler from before
        assert signal.getsignal(signal.SIGTERM) is not stop._handle
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job's SIGINT
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # stays ignored
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_sigterm_mid_step_finishes_the_step_saves_it_and_stops(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=4", "train.checkpoint_every=0"])
    trainer = Trainer(cfg, progress=False)
    sent = []

    def preempt(module, args, output):  # a real SIGTERM during step 2's update
        if torch.is_grad_enabled() and trainer.state.step == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return output

    trainer.model.register_forward_hook(preempt)
    outer = []  # what was there before fit; it must get SIGTERM back afterwards
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: outer.append(signum))
    try:
        with pytest.raises(TrainingInterruptedError, match=r"SIGTERM after step 2 of 4") as info:
            trainer.fit()
        assert signal.getsignal(signal.SIGTERM) is not None and outer == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert outer == [signal.SIGTERM]  # fit restored the handler it replaced
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.exit_code == 143
    assert f"seqrl train --resume {trainer.run_dir}" in str(info.value)
    assert trainer.state.step == 2 and _steps(trainer.run_dir) == [1, 2]
    assert ckpt.load_latest(trainer.run_dir / "checkpoints").step == 2  # checkpoint_every=0

    resumed = Trainer.resume(trainer.run_dir, progress=False)  # the lock was released
    resumed.fit()
    assert _steps(trainer.run_dir) == [1, 2, 3, 4]


# ------------------------------------------------------------------ torn logs, failed writes
def test_a_torn_last_log_line_is_dropped_and_a_corrupt_one_is_reported(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "reward/mean": 0.5}) for s in (1, 2, 3)]
    path.write_text("\n".join(good) + '\n{"step": 4, "reward/me')  # killed mid-write
    assert truncate_jsonl(path, 2) is True
    assert path.read_text() == "\n".join(good[:2]) + "\n"
    assert truncate_jsonl(path, 2) is False

    path.write_text(good[0] + "\n{oops\n" + good[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, record 2 of 3 is not a valid log"):
        truncate_jsonl(path, 3)
    assert path.read_text() == good[0] + "\n{oops\n" + good[2] + "\n"  # nothing rewritten


def test_resume_after_a_kill_mid_log_write(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=3", "train.checkpoint_every=1"])
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    run = trainer.run_dir
    shutil.rmtree(run / "checkpoints" / "step-3")
    shutil.rmtree(run / "final")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/mean": 0.2')  # the start of a record, no newline
    resumed = Trainer.resume(run, progress=False)
    resumed.fit()
    assert _steps(run) == [1, 2, 3]
    assert all(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())


def test_a_failed_checkpoint_write_names_the_file_and_the_intact_checkpoint(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=3", "train.checkpoint_every=1"])
    trainer = Trainer(cfg, progress=False)
    root = trainer.run_dir / "checkpoints"
    root.mkdir()
    blocker = root / f".tmp-step-2-{os.getpid()}"  # a file where step 2's save needs a folder
    blocker.write_text("")
    with pytest.raises(TrainingAbortedError) as info:
        trainer.fit()
    message = str(info.value)
    assert f"could not write checkpoint step-2: {blocker}: File exists" in message
    assert f"The last complete checkpoint, {root / 'step-1'}, is intact" in message
    assert f"seqrl train --resume {trainer.run_dir}" in message
    blocker.unlink()
    Trainer.resume(trainer.run_dir, progress=False).fit()  # the lock was released
    assert _steps(trainer.run_dir) == [1, 2, 3]


# ------------------------------------------------------------------ real processes
FAST_CLI = [
    "model.policy=builtin:nano",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.eval_size=8",
    "train.eval_samples=2",
    "train.eval_every=3",
    "algo.micro_batch_size=8",
    "log.tensorboard=false",
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, PYTHONPATH=SRC, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _train(launcher: list[str], overrides: list[str]) -> subprocess.Popen:
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(
        [*launcher, "-m", "seqrl", "train", "--no-progress", *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (run / "metrics.jsonl").exists() or max(_steps(run), default=0) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comparable(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resume_is_bit_identical(sig, tmp_path):
    common = [*FAST_CLI, f"output_dir={tmp_path}", "train.steps=6", "train.checkpoint_every=0"]
    run = tmp_path / "stopped"
    victim = _train([sys.executable], [*common, "name=stopped"])
    _wait_for_step(victim, run, 2)
    victim.send_signal(sig)
    out = victim.communicate(timeout=300)[0]
    assert victim.returncode == 128 + sig, out  # 143 or 130
    assert "Traceback" not in out
    saved = ckpt.load_latest(run / "checkpoints")
    assert saved is not None and saved.step == max(_steps(run)) < 6, out
    assert f"saved {run / 'checkpoints' / f'step-{saved.step}'}" in out
    assert f"resume with: seqrl train --resume {run}" in out
    if sig == signal.SIGINT:
        return  # the same path from here on: one resume is enough

    straight = _train([sys.executable], [*common, "name=straight"])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    done = subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(run) == _comparable(tmp_path / "straight")


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    common = [*FAST_CLI, f"output_dir={tmp_path}", "name=run", "train.steps=200"]
    proc = _train([sys.executable], [*common, "train.checkpoint_every=1"])
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    first = proc.stdout.readline()
    while "received" not in first:  # the first one is handled: now the second
        first = proc.stdout.readline()
    assert "Ctrl-C again stops at once" in first
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "stopped at once; the last complete checkpoint is" in out, out
    assert "Traceback" not in out
    # the second signal may land in a checkpoint save: that save is dropped, the last one stays
    saved = ckpt.load_latest(run / "checkpoints")
    assert saved is not None and saved.step >= 1
    resumed = Trainer.resume(run, progress=False)  # loads, and the lock is free
    assert resumed.state.step == saved.step
    resumed.close()


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_stops_every_rank_at_the_same_step(tmp_path):
    run = tmp_path / "two"
    common = [
        *FAST_CLI,
        "model.policy=builtin:tiny-addition",
        f"output_dir={tmp_path}",
        "name=two",
        "train.steps=30",
        "train.checkpoint_every=0",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                f"--master-port={_free_port()}"]  # fmt: skip
    job = _train(torchrun, common)
    _wait_for_step(job, run, 2)
    job.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
    out = job.communicate(timeout=120)[0]
    assert job.returncode != 0
    saved = ckpt.load_latest(run / "checkpoints")
    assert saved is not None and saved.step == max(_steps(run)) < 30, out
    assert out.count("stopped by SIGTERM") == 1, out  # rank 0 says so, once

    resume = [*torchrun[:-1], f"--master-port={_free_port()}", "-m", "seqrl", "train"]
    done = subprocess.run(
        [*resume, "--no-progress", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _steps(run) == list(range(1, 31))


# ------------------------------------------------------------------ a read-only or full disk
def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs root and `unshare -m` (private mounts)"
)


def _in_private_mounts(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a shell script in its own mount namespace: its mounts vanish when it exits."""
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


@pytest.mark.slow
@needs_mount
def test_a_read_only_checkpoint_folder_stops_with_the_intact_checkpoint_named(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=4", "train.checkpoint_every=2"])
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    run, checkpoints = trainer.run_dir, trainer.run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-4")
    shutil.rmtree(run / "final")
    done = _in_private_mounts(
        f"mount --bind {checkpoints} {checkpoints} && "
        f"mount -o remount,bind,ro {checkpoints} && "
        f"exec {sys.executable} -m seqrl train --no-progress --resume {run}"
    )
    err = done.stderr
    assert done.returncode == 2, done.stdout + err
    assert "Traceback" not in err
    assert "could not write checkpoint step-" in err and "Read-only file system" in err, err
    assert f"The last complete checkpoint, {checkpoints / 'step-2'}, is intact" in err
    assert ckpt.load_latest(checkpoints).step == 2

    done = _in_private_mounts(
        f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && "
        f"exec {sys.executable} -m seqrl train --no-progress --resume {run}"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Read-only file system" in done.stderr, done.stderr


@pytest.mark.slow
@needs_mount
def test_a_full_disk_stops_with_the_intact_checkpoint_named(tmp_path):
    out = tmp_path / "small"  # 1.6 MB: one checkpoint of the nano model (1 MB) fits, two do not
    out.mkdir()
    overrides = [*FAST_CLI, f"output_dir={out}", "name=run", "train.steps=4"]
    sets = " ".join(f"--set {o}" for o in [*overrides, "train.checkpoint_every=1"])
    done = _in_private_mounts(
        f"mount -t tmpfs -o size=1600k tmpfs {out} && "
        f"{sys.executable} -m seqrl train --no-progress {sets}; echo exit=$?; "
        f"ls -a {out}/run/checkpoints"
    )
    err, listing = done.stderr, done.stdout
    assert "exit=2" in listing, listing + err
    assert "Traceback" not in err
    assert "could not write checkpoint step-2" in err and "No space left on device" in err, err
    assert f"The last complete checkpoint, {out / 'run' / 'checkpoints' / 'step-1'}" in err
    assert ".tmp-step" not in listing  # the failed save gave its space back
