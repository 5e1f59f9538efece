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
import shutil
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

pytestmark = pytest.mark.slow  # 2-process runs: CI runs them, `-m "not slow"` skips them

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
    "train.checkpoint_every=1",
    # one layout for every micro-batch: which layout is cheapest depends on the rows a
    # micro-batch holds, which differ with the number of processes, and layouts agree only to
    # float32 rounding (tests/train/test_packing.py); this test is about the data-parallel maths
    "algo.shared_prefix=false",
    "algo.packing=false",
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


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={_free_port()}", "-m", "seqrl", "train", *args, "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_process_run_equals_one_process_run_and_resumes(tmp_path):
    one = Trainer(load_config(None, [*RUN, f"output_dir={tmp_path}", "name=one"]), progress=False)
    one.fit()
    _torchrun(*[f"--set={o}" for o in [*RUN, f"output_dir={tmp_path}", "name=two"]])

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
    assert not list(tmp_path.glob("two/*rank*"))

    # resume with the same world size from step 1: the same final parameters and log
    run = tmp_path / "two"
    shutil.rmtree(run / "checkpoints" / "step-2")
    shutil.rmtree(run / "final")
    _torchrun("--resume", str(run))
    c = load_file(run / "final" / "model.safetensors")
    for key in b:
        torch.testing.assert_close(c[key], b[key], rtol=0, atol=1e-7, msg=key)
    assert [r["step"] for r in _metrics(run)] == [r["step"] for r in m2]


# ------------------------------------------------------------------ every aggregation, critics
# (loss name, overrides): token-mean, seq-mean-token-mean, seq-mean-token-sum(-norm), FIPO's
# drop rule (token sum, then divide by the kept tokens of all ranks), and the in-loss KL.
CASES = [
    ("dapo", {}),
    ("gspo", {"clip_low": 0.2, "clip_high": 0.2}),
    ("grpo", {}),
    ("dr_grpo", {"max_tokens": 8.0}),
    ("grpo", {"agg": "seq-mean-token-sum", "kl_coef": 0.0}),
    ("fipo", {}),
]
CRITICS = [("token", "mse"), ("token", "bce"), ("scalar", "mse")]


def _problem():
    """A real rollout of the nano policy with its per-prompt streams, and fixed advantages."""
    from seqrl.models import load_policy
    from seqrl.rollout import HFSampler

    model, tok = load_policy("builtin:nano")
    sampler = HFSampler(model, tok, max_new_tokens=8)
    prompts = ["12+3=", "4+56=", "789+1=", "2+2="]
    batch = sampler.generate(prompts, group_size=3, seeds=[11, 12, 13, 14])  # B = 12
    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(12, generator=gen)  # [B]
    rewards = (torch.rand(12, generator=gen) > 0.5).float()  # [B]
    return model, tok, batch, advantages, rewards


def _rows(batch, lo: int, hi: int):
    from seqrl.train.sampling import select_groups

    keep = torch.zeros(batch.response_ids.shape[0] // batch.group_size, dtype=torch.bool)
    keep[lo // batch.group_size : hi // batch.group_size] = True
    return select_groups(batch, keep)


def _updates(info) -> dict[str, torch.Tensor]:
    """Parameters after a 2-epoch × 2-minibatch update for every case, on this rank's rows."""
    import copy

    from seqrl.models.critic import build_critic
    from seqrl.train.critic import Critic, CriticSettings
    from seqrl.train.step import UpdateSettings, batch_logprobs, update_policy

    torch.manual_seed(0)
    model, tok, batch, advantages, rewards = _problem()
    B = batch.response_ids.shape[0] // info.world_size
    lo, hi = info.rank * B, (info.rank + 1) * B
    local, adv_local, rewards_local = _rows(batch, lo, hi), advantages[lo:hi], rewards[lo:hi]
    old = batch_logprobs(model, local, temperature=1.0, micro_batch_size=4)
    ref = old - 0.05  # a reference a little away from π_old, so the KL term has a gradient
    out = {}
    for i, (name, overrides) in enumerate(CASES):
        policy = copy.deepcopy(model)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        overrides = {"kl_coef": 0.1, **overrides} if name != "fipo" else overrides
        settings = UpdateSettings(name, overrides, 2, 2, 3, 1e9, 1.0, "truncate", "token", 1.5)
        gen = torch.Generator().manual_seed(i)
        update_policy(policy, opt, local, adv_local, old, ref, settings, gen, info)
        out |= {f"{i}/{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    for kind, loss in CRITICS:
        net = build_critic("builtin:nano", model, tok, seed=0)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        critic = Critic(net, opt, sched, CriticSettings(kind, 2, 2, 3, 1e9, loss), info)
        values = critic.values(local)
        adv, targets = critic.advantages(local, rewards_local, values)
        critic.update(local, targets, values, torch.Generator().manual_seed(7))
        tag = f"{kind}-{loss}"
        out[f"{tag}/advantages"] = adv
        out |= {f"{tag}/{k}": v.detach().clone() for k, v in net.state_dict().items()}
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from seqrl.train.dist import DistInfo

    try:
        out = _updates(DistInfo(rank, world))
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_aggregation_and_critic_update_is_exact_over_two_processes(tmp_path):
    from seqrl.train.dist import DistInfo

    path = str(tmp_path / "params")
    mp.start_processes(_worker, args=(2, _free_port(), path), nprocs=2, start_method="spawn")
    two = [torch.load(f"{path}.{r}") for r in range(2)]
    one = _updates(DistInfo())
    for key, value in one.items():
        if key.endswith("/advantages"):  # each rank holds its rows' advantages
            torch.testing.assert_close(torch.cat([two[0][key], two[1][key]]), value, msg=key)
            continue
        for r in range(2):
            # case 4 (token sums) moves weights by ~1.5, and its rounding differences reach 3e-6
            torch.testing.assert_close(two[r][key], value, rtol=1e-5, atol=1e-5, msg=key)
