"""Data parallelism is exact: two gloo processes train to the parameters one process reaches.

The 2-process runs are real ``torchrun`` jobs (CLI) or ``torch.multiprocessing`` workers on the
built-in models, one thread each. AdamW's eps is raised to 1e-3 in the end-to-end comparison:
Adam divides each gradient by its own running RMS, so for parameters whose true gradient is ~0
it turns float-rounding noise (the two runs sum micro-batches in different orders) into
lr-sized steps of random sign; a larger eps keeps the comparison about the maths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from seqrl.config import load_config
from seqrl.models import load_policy
from seqrl.train.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[2] / "src")
RUN = [
    "model.policy=builtin:tiny-addition",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.eval_size=6",
    "train.eval_samples=1",
    "train.eval_every=0",
    "train.steps=2",
    "algo.name=dapo",  # token-mean over the minibatch: per-rank normalisation would show
    "algo.num_minibatches=2",
    "algo.micro_batch_size=3",
    "optim.lr=1e-3",
    "optim.eps=1e-3",
    "log.tensorboard=false",
]


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=SRC)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_run_equals_one_process_run(tmp_path):
    one = Trainer(load_config(None, [*RUN, f"output_dir={tmp_path}", "name=one"]), progress=False)
    one.fit()
    sets = [f"--set={o}" for o in [*RUN, f"output_dir={tmp_path}", "name=two"]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={_free_port()}", "-m", "seqrl", "train", *sets, "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    start = load_policy("builtin:tiny-addition")[0].state_dict()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6, msg=key)
    assert moved > 1e-4  # the steps did change the parameters (by far more than the tolerance)

    # rank 0 wrote one log; the rollouts, rewards, losses and evals are the 1-process ones
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in m2] == [r["step"] for r in m1]
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("reward/mean", "reward/std", "response_len/q25", "response_len/max",
                    "train/accuracy", "policy/grad_norm", "eval/greedy_acc", "eval/sampled_acc"):  # fmt: skip
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    assert (tmp_path / "two" / "checkpoints").is_dir()
    assert not list(tmp_path.glob("two/*rank*"))

