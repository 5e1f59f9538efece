"""FSDP2 (``dist.strategy: fsdp``) trains to the parameters one unsharded process reaches.

The 2-process runs are ``torch.multiprocessing`` workers and real ``torchrun`` jobs over gloo,
one thread each, on the built-in models; the 1-process references run in the test process.
AdamW's eps is raised to 1e-3 for the same reason as in test_distributed.py (parameters whose
true gradient is ~0 would otherwise turn float-rounding noise into lr-sized steps).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from seqrl.config import ConfigError, load_config, validate_warnings
from seqrl.train import checkpoint as ckpt
from seqrl.train import sharding
from seqrl.train.dist import DistInfo
from seqrl.train.forward import forward_layout
from seqrl.train.trainer import Trainer

SRC = str(Path(__file__).resolve().parents[2] / "src")
COMMON = [
    "model.policy=builtin:tiny-addition",
    "task.eval_size=4",
    "train.eval_samples=1",
    "train.eval_every=0",
    "train.steps=2",
    "train.checkpoint_every=0",
    "algo.micro_batch_size=3",  # minibatch shares of 1–5 rows: 1 or 2 micro-batches a process
    "optim.lr=1e-3",
    "optim.eps=1e-3",
    "log.tensorboard=false",
]
# Every case has several minibatches per rollout; the permutation is global, so the two
# processes hold different numbers of rows of a minibatch (and run padding passes).
CASES = {
    "grpo": ["preset=grpo", "rollout.prompts_per_step=4", "rollout.group_size=4"],  # + frozen ref
    "gspo": [  # + activation checkpointing (recomputed forwards inside FSDP's backward)
        "preset=gspo",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "model.gradient_checkpointing=true",
    ],
    "fipo": [  # + dynamic sampling: 3 kept groups rebalanced as 2 + 1
        "preset=fipo",
        "rollout.prompts_per_step=3",
        "rollout.group_size=4",
        "rollout.gen_batch_prompts=7",
        "rollout.max_gen_batches=3",
        "algo.num_minibatches=3",
    ],
    "sppo": [  # scalar critic
        "preset=sppo",
        "rollout.prompts_per_step=8",
        "rollout.group_size=1",
        "algo.num_minibatches=2",
    ],
    "ppo": [  # token critic, GAE whitened over both processes
        "preset=ppo",
        "rollout.prompts_per_step=8",
        "rollout.group_size=1",
        "algo.num_minibatches=2",
        "critic.warmup_steps=0",
    ],
    "lora": [  # adapters sharded with their layers; the reference is the policy, adapters off
        "preset=grpo",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "model.lora.r=4",
        "optim.lr=1e-2",
    ],
    "moe": [  # Routing Replay: routing recorded at θ_old, replayed in the sharded updates
        "preset=grpo_moe_replay",
        "model.policy=builtin:tiny-moe-addition-noisy",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture
def own_process_group():
    """Tear down the one-process group an in-process fsdp run starts."""
    started_here = not dist.is_initialized()
    yield
    if started_here and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ config (fast)


def test_config_strategy_default_options_and_refusals():
    cfg = load_config(None, [])
    assert cfg.dist.strategy == "replicate" and not cfg.dist.fsdp.cpu_offload
    cfg = load_config(
        None, ["dist.strategy=fsdp", "dist.fsdp.param_dtype=bfloat16", "dist.fsdp.cpu_offload=true"]
    )
    assert cfg.dist.fsdp.param_dtype == "bfloat16" and validate_warnings(cfg) == []
    # the fast layouts are allowed: a sharded model runs them padded (forward.forward_layout)
    assert load_config(None, ["dist.strategy=fsdp", "algo.shared_prefix=true"]).algo.packing
    with pytest.raises(ConfigError, match=r"rollout\.engine=vllm with LoRA"):
        load_config(None, ["dist.strategy=fsdp", "rollout.engine=vllm", "model.lora.r=4"])
    with pytest.raises(ConfigError, match=r"cpu_offload=false"):
        load_config(None, ["dist.strategy=fsdp", "dist.fsdp.cpu_offload=true", "device=cpu"])
    with pytest.raises(ConfigError, match=r"did you mean 'dist\.strategy'"):
        load_config(None, ["dist.stratgy=fsdp"])
    (warning,) = validate_warnings(load_config(None, ["dist.fsdp.cpu_offload=true"]))
    assert "dist.fsdp.cpu_offload applies only to dist.strategy=fsdp" in warning
    (warning,) = validate_warnings(
        load_config(
            None, ["dist.strategy=fsdp", "dist.fsdp.param_dtype=bfloat16", "model.dtype=bfloat16"]
        )
    )
    assert "master weights" in warning


# ------------------------------------------------------------------ one process (fast)


def test_one_process_fsdp_equals_replicate_and_skips_a_truncated_shard(tmp_path, own_process_group):
    """SPPO on the nano model (its critic makes the advantages non-zero from step 1)."""
    run = [
        "preset=sppo",
        "model.policy=builtin:nano",
        "rollout.prompts_per_step=8",
        "rollout.group_size=1",
        "algo.num_minibatches=2",
        "algo.micro_batch_size=3",
        "task.eval_size=4",
        "train.eval_samples=1",
        "train.eval_every=0",
        "train.steps=2",
        "train.checkpoint_every=1",
        "log.tensorboard=false",
        f"output_dir={tmp_path}",
    ]
    Trainer(load_config(None, [*run, "name=plain"]), progress=False).fit()
    sharded = Trainer(load_config(None, [*run, "name=fsdp", "dist.strategy=fsdp"]), progress=False)
    assert sharding.is_sharded(sharded.model) and sharding.is_sharded(sharded.critic.model)
    assert sharded.cfg.algo.shared_prefix and sharded.cfg.algo.packing  # the defaults, and yet
    batch = sharded.sampler.generate(["1+2=", "3+4="], group_size=4, seeds=[0, 1])
    for model in (sharded.model, sharded.critic.model):  # one forward per micro-batch everywhere
        assert forward_layout(model, batch, torch.arange(8), shared_prefix=True, packing=True) == (
            "joint"
        )
    sharded.fit()
    for sub in ("", "critic"):
        a = load_file(tmp_path / "plain" / "final" / sub / "model.safetensors")
        b = load_file(tmp_path / "fsdp" / "final" / sub / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{sub} {key}")

    root = tmp_path / "fsdp" / "checkpoints"
    assert (root / "step-2" / ckpt.SHARDED / ".metadata").is_file()
    assert not list(root.glob(".tmp*"))
    assert ckpt.load_latest(root).step == 2
    # a truncated shard file: that checkpoint is skipped with a warning, the older one is used
    shard = max((root / "step-2" / ckpt.SHARDED).glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"step-2 is unreadable.*truncated"):
        latest = ckpt.load_latest(root)
    assert latest.step == 1 and latest.sharded


def test_mixed_precision_gathers_bfloat16_and_keeps_float32_shards(own_process_group):
    from seqrl.models import load_policy

    model, tok = load_policy("builtin:nano")
    settings = sharding.ShardSettings(param_dtype="bfloat16", reduce_dtype="float32")
    sharding.shard_model(model, sharding.device_mesh(torch.device("cpu")), settings)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tok(["12+3="], return_tensors="pt", add_special_tokens=False)["input_ids"]
    model(input_ids=ids).logits.float().sum().backward()
    opt.step()
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())
    with sharding.gathered(model):  # what generation computes with
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded again after


def test_padding_and_helpers_do_nothing_without_fsdp():
    from seqrl.models import load_policy

    model, _ = load_policy("builtin:nano")
    padding = sharding.Padding(model, backward=True)
    assert not padding.active and padding.most(3) == 3  # no collective, no process group
    assert sharding.train_padding(model) is None and not sharding.is_sharded(model)
    assert not sharding.has_sharded_params(list(model.parameters()))


# ------------------------------------------------------------------ two processes (slow)


def _fake_engine():
    """What VLLMSampler.sync_weights reaches inside vLLM: a model with ``load_weights``.

    It records each (name, tensor) and checks that the previous tensor was freed before the
    next one was gathered (the iterator keeps no reference: one full tensor at a time).
    """
    got, state, previous = {}, {"lazy": None, "alive_when_next": 0}, []

    def load_weights(items):
        state["lazy"] = not isinstance(items, (list, tuple))
        for name, tensor in items:
            if previous and previous[-1]() is not None:
                state["alive_when_next"] += 1
            got[name] = tensor.clone()
            previous.append(weakref.ref(tensor))
            del tensor

    model = SimpleNamespace(load_weights=load_weights)
    runner = SimpleNamespace(model_runner=SimpleNamespace(model=model))
    engine = SimpleNamespace(
        model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=runner))
    )
    return SimpleNamespace(llm_engine=engine), got, state


def _pushed(model) -> tuple[dict, dict]:
    """The weights VLLMSampler.sync_weights pushes from ``model`` to a fake engine."""
    from seqrl.rollout.vllm import VLLMSampler

    sampler = VLLMSampler.__new__(VLLMSampler)  # no vLLM here: the engine is the fake
    sampler.model, (sampler.llm, got, state) = model, _fake_engine()
    sampler.sync_weights()
    return got, state


def _problem():
    """A real rollout of the nano policy and fixed advantages: 12 rows."""
    from seqrl.models import load_policy
    from seqrl.rollout import HFSampler

    model, tok = load_policy("builtin:nano")
    batch = HFSampler(model, tok, max_new_tokens=8).generate(
        ["12+3=", "4+56=", "789+1=", "2+2="], group_size=3, seeds=[11, 12, 13, 14]
    )
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(0))  # [B]
    return model, batch, advantages


def _update_with_an_empty_share(info: DistInfo) -> dict:
    """DAPO and FIPO updates where rank 0 holds every row and rank 1 none (rebalanced groups)."""
    import copy

    from seqrl.train.sampling import select_groups
    from seqrl.train.step import UpdateSettings, batch_logprobs, update_policy

    model, batch, advantages = _problem()
    mine = torch.full((4,), info.rank == 0)
    local, adv = select_groups(batch, mine), advantages[: 12 if info.rank == 0 else 0]
    out = {}
    for name in ("dapo", "fipo"):
        policy = copy.deepcopy(model)
        if info.active:
            mesh = sharding.device_mesh(torch.device("cpu"))
            sharding.shard_model(policy, mesh, sharding.ShardSettings())
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, eps=1e-3)
        old = batch_logprobs(policy, local, temperature=1.0, micro_batch_size=4)
        settings = UpdateSettings(name, {}, 2, 2, 3, 1.0, 1.0)
        update_policy(policy, opt, local, adv, old, None, settings, torch.Generator(), info)
        out |= {f"{name}/{k}": v for k, v in sharding.full_tensors(policy)}
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out_dir)
    try:
        for case, overrides in CASES.items():
            cfg = load_config(
                None,
                [*COMMON, *overrides, f"output_dir={out}", f"name={case}", "dist.strategy=fsdp"],
            )
            trainer = Trainer(cfg, progress=False)
            trainer.fit()
            weights = dict(sharding.full_tensors(trainer.model))  # every rank gathers
            if rank == 0:
                torch.save(weights, out / f"{case}.trained.pt")
        # the vLLM weight push from a sharded policy, into a fake engine
        from seqrl.models import load_policy

        policy = load_policy("builtin:tiny-addition")[0]
        sharding.shard_model(
            policy, sharding.device_mesh(torch.device("cpu")), sharding.ShardSettings()
        )
        got, state = _pushed(policy)
        torch.save({"got": got, "state": state}, out / f"pushed.{rank}.pt")
        torch.save(_update_with_an_empty_share(DistInfo(rank, world)), out / f"empty.{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fsdp_runs_equal_one_process_runs(tmp_path):
    """grpo, gspo, fipo (with dynamic sampling), sppo and ppo (critics), LoRA and MoE replay."""
    two = tmp_path / "two"
    mp.start_processes(_worker, args=(2, _free_port(), str(two)), nprocs=2, start_method="spawn")
    from seqrl.models import load_policy
    from seqrl.rollout.vllm import hf_weight_items

    for case, overrides in CASES.items():
        cfg = load_config(None, [*COMMON, *overrides, f"output_dir={tmp_path}", f"name={case}"])
        Trainer(cfg, progress=False).fit()
        start = load_policy(cfg.model.policy)[0].state_dict()
        final = load_policy(two / case / "final")[0].state_dict()  # (MoE: experts fused again)
        moved = max((final[k] - start[k]).abs().max().item() for k in final)
        assert moved > 1e-4, case  # the updates moved the weights far beyond the tolerance
        atol = max(2e-6, 1e-4 * moved)  # float rounding (sums in another order), lr-sized moves
        subs = ["", "critic"] if cfg.critic.kind != "none" else [""]
        for sub in subs:
            a = load_file(tmp_path / case / "final" / sub / "model.safetensors")
            b = load_file(two / case / "final" / sub / "model.safetensors")
            assert a.keys() == b.keys(), case
            for key in a:
                diff = (b[key] - a[key]).abs().max().item()
                assert diff <= atol, f"{case} {sub} {key}: {diff:.2e} > {atol:.2e}"
        m1 = [json.loads(x) for x in (tmp_path / case / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(x) for x in (two / case / "metrics.jsonl").read_text().splitlines()]
        for r1, r2 in zip(m1, m2, strict=True):  # the same rollouts, losses and norms
            for key in ("reward/mean", "sampling/kept_groups", "eval/greedy_acc"):
                if key in r1:
                    assert r2[key] == r1[key], (case, key)
            for key in ("loss/policy", "loss/kl", "policy/grad_norm", "critic/loss"):
                if key in r1:  # (grad norms of ~50–800 under the KL term: rounding shows)
                    assert r2[key] == pytest.approx(r1[key], rel=2e-3, abs=1e-6), (case, key)
        # final/ is a plain Hugging Face model with exactly the trained (gathered) parameters
        if case != "lora":  # (LoRA: final/ holds the merged weights)
            loaded = AutoModelForCausalLM.from_pretrained(two / case / "final").state_dict()
            trained = torch.load(two / f"{case}.trained.pt")
            for key, value in trained.items():
                assert torch.equal(loaded[key], value), (case, key)

    # vLLM push: lazy, one gathered tensor alive at a time, the unsharded weights by HF name
    plain = dict(hf_weight_items(load_policy("builtin:tiny-addition")[0]))
    for r in range(2):
        pushed = torch.load(two / f"pushed.{r}.pt", weights_only=False)
        assert pushed["state"]["lazy"] and pushed["state"]["alive_when_next"] == 0
        assert pushed["got"].keys() == plain.keys()
        for key, value in plain.items():
            assert torch.equal(pushed["got"][key], value), key

    # one process holding every row, the other none: still the one-process update
    one = _update_with_an_empty_share(DistInfo())
    for r in range(2):
        got = torch.load(two / f"empty.{r}.pt")
        for key, value in one.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _torchrun(nproc: int, *args: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", "-m", "seqrl", "train", *args, "--no-progress"]  # fmt: skip
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


@pytest.mark.slow
def test_fsdp_kill_and_resume_on_two_and_on_one_process(tmp_path, own_process_group):
    run = [*COMMON, "preset=gspo", "rollout.prompts_per_step=4", "rollout.group_size=4",
           "train.steps=3", "train.checkpoint_every=1", "dist.strategy=fsdp",
           f"output_dir={tmp_path}"]  # fmt: skip
    sets = lambda name: [f"--set={o}" for o in [*run, f"name={name}"]]  # noqa: E731
    straight = _torchrun(2, *sets("straight"))
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]

    victim = _torchrun(2, *sets("killed"), start_new_session=True)
    killed = tmp_path / "killed"
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-1" / ckpt.MARKER).exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    victim.wait()
    assert not (killed / "final").exists()
    shutil.copytree(killed, tmp_path / "one")  # the same interrupted run, resumed on 1 process

    resumed = _torchrun(2, "--resume", str(killed))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key  # same processes, same shards: bit for bit

    def rows(path):
        return [
            {k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "throughput/"))}
            for x in (path / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(killed) == rows(tmp_path / "straight")

    # the 2-process sharded checkpoint, resumed by one process (DCP reshards on load)
    one = Trainer.resume(tmp_path / "one", progress=False)
    assert one.state.step >= 1 and sharding.is_sharded(one.model)
    one.fit()
    c = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=2e-6, msg=key)
