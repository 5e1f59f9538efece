"""Asynchronous rollouts (``rollout.max_staleness``): a worker process samples ahead, exactly.

The reference is a slow synchronous loop (:class:`StaleSync`) that keeps a copy of every
policy version and samples step t in this process with version max(0, t − 1 − k). The async
run must equal it bit for bit (weights and every logged metric but timings), whatever the
timing of the two processes; with k = 0 the worker must reproduce today's synchronous loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqrl.config import load_config
from seqrl.train import builders as B
from seqrl.train import checkpoint as ckpt
from seqrl.train.rollout_worker import RolloutWorkerError, WeightSlots, behaviour_version
from seqrl.train.sampling import collect_step
from seqrl.train.trainer import Trainer, TrainingAbortedError
from support import kill_when_checkpointed


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The worker samples with one torch thread; bit-for-bit equality needs the same here.

    CPU matrix products can round differently with another number of threads (docs/scaling.md).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StaleSync(Trainer):
    """The synchronous reference: samples step t here, with the weights of step t − 1 − k."""

    def __init__(self, cfg, k: int, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.async_staleness, self.k = None, k  # no worker: this class samples itself
        rng = torch.get_rng_state()  # building a second policy must not move the run's stream
        self.behaviour, _ = B.build_policy(cfg, self.device, self.dist)
        self.behaviour, _ = B.add_lora(cfg, self.behaviour, None, cfg.resolved_loss(), self.dist)
        torch.set_rng_state(rng)
        self.behaviour_sampler = B.build_sampler(
            cfg,
            self.behaviour,
            self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            device=self.device,
            run_dir=self.run_dir,
            dist=self.dist,
        )
        self.versions = {0: self._weights()}
        self.sampled_with: dict[int, int] = {}

    def _weights(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def collect(self, step):
        version = max(0, step - 1 - self.k)
        self.sampled_with[step] = version
        self.behaviour.load_state_dict(self.versions[version])
        return collect_step(
            self.behaviour_sampler,
            self.tokenizer,
            self.task,
            self.prompts,
            self.sampling_settings,
            step,
            greedy_baseline_too=self.cfg.algo.advantage == "remax",
        )

    def train_step(self, step):
        metrics = super().train_step(step)
        self.versions[step] = self._weights()
        return metrics


def _cfg(fast_overrides, name, *extra, steps=4):
    """The fast settings on the warm-started tiny model (mixed rewards, so every step learns)."""
    base = [o for o in fast_overrides if not o.startswith("name=")]
    base += ["model.policy=builtin:tiny-addition", f"name={name}", f"train.steps={steps}"]
    return load_config(None, [*base, *extra])


def _comparable(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skip = ("time/", "throughput/", "async/")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]


def _assert_same_run(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert _comparable(a.run_dir) == _comparable(b.run_dir)
    samples = [(r.run_dir / "samples.jsonl").read_text() for r in (a, b)]
    assert samples[0] == samples[1]


def _async_rows(trainer: Trainer) -> list[dict]:
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "async/staleness_max" in r]


def test_k1_equals_a_synchronous_loop_that_samples_with_one_step_old_weights(fast_overrides):
    k1 = Trainer(_cfg(fast_overrides, "async", "rollout.max_staleness=1"), progress=False)
    k1.fit()
    ref = StaleSync(_cfg(fast_overrides, "ref", "rollout.max_staleness=1"), 1, progress=False)
    ref.fit()
    assert ref.sampled_with == {1: 0, 2: 0, 3: 1, 4: 2}
    _assert_same_run(k1, ref)
    # every sample of step t is min(1, t − 1) versions old, and the loss saw it: π_prox ≠ μ
    rows = _async_rows(k1)
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["async/staleness_mean"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    # and it is not the synchronous run: there μ = π_old up to rounding at every step
    sync = Trainer(_cfg(fast_overrides, "sync"), progress=False)
    sync.fit()
    sync_rows = [r for r in _comparable(sync.run_dir) if "mismatch/kl" in r]
    assert all(abs(r["mismatch/kl"]) < 1e-6 for r in sync_rows)
    assert all(abs(r["mismatch/kl"]) > 1e-5 for r in rows[2:])
    assert any(
        not torch.equal(a, b)
        for a, b in zip(sync.model.parameters(), k1.model.parameters(), strict=True)
    )
    assert k1._worker is None  # stopped when fit returned


@pytest.mark.slow
def test_k0_through_the_worker_is_the_synchronous_loop_bit_for_bit(fast_overrides):
    sync = Trainer(_cfg(fast_overrides, "sync", "preset=dapo"), progress=False)
    sync.fit()
    worker = Trainer(_cfg(fast_overrides, "worker", "preset=dapo"), progress=False)
    worker.async_staleness = 0  # the worker samples step t with version t − 1
    worker.fit()
    _assert_same_run(sync, worker)
    assert [r["async/staleness_max"] for r in _async_rows(worker)] == [0.0] * 4


CASES = {
    # the worker refills: dynamic sampling draws side-stream prompts with the stale weights
    "dapo-dynamic": ["preset=dapo", "rollout.gen_batch_prompts=8", "rollout.max_gen_batches=3"],
    "k2-fipo": ["preset=fipo", "rollout.max_staleness=2", "rollout.dynamic_sampling=false"],
    "sppo-critic": ["preset=sppo", "rollout.group_size=1", "rollout.prompts_per_step=8"],
    "ppo-critic": ["preset=ppo", "rollout.group_size=1", "rollout.prompts_per_step=8",
                   "critic.warmup_steps=1"],
    "lora": ["model.lora.r=4", "preset=grpo"],
    "moe-replay": ["preset=grpo_moe_replay", "model.policy=builtin:tiny-moe",
                   "algo.num_minibatches=2"],
    "remax": ["preset=remax", "rollout.group_size=2"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_async_equals_the_stale_synchronous_reference(case, fast_overrides):
    extra = CASES[case]
    k = 2 if "rollout.max_staleness=2" in extra else 1
    extra = [*extra, f"rollout.max_staleness={k}"]
    run = Trainer(_cfg(fast_overrides, "async", *extra), progress=False)
    run.fit()
    ref = StaleSync(_cfg(fast_overrides, "ref", *extra), k, progress=False)
    ref.fit()
    _assert_same_run(run, ref)
    rows = _async_rows(run)
    assert [r["async/staleness_max"] for r in rows] == [min(k, t - 1) for t in range(1, 5)]
    if case == "dapo-dynamic":
        assert any(r.get("sampling/gen_batches", 0) > 1 for r in rows)
    if case == "moe-replay":
        assert any("moe/routing_churn" in key for key in rows[-1])


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.slow
def test_resume_after_kill_of_an_async_run_is_exact(fast_overrides, tmp_path):
    common = [o for o in fast_overrides if not o.startswith("name=")]
    common += ["rollout.max_staleness=2", "train.steps=7", "train.checkpoint_every=1"]
    straight = _cli(*_sets([*common, "name=straight"]))
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    run = tmp_path / "killed"
    kill_when_checkpointed([*common, "name=killed"], run, step=4, timeout=600)
    latest = ckpt.load_latest(run / "checkpoints")
    assert sorted(latest.state["rollout_versions"]) == [latest.step - 2, latest.step - 1]

    resumed = subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _comparable(run) == _comparable(tmp_path / "straight")


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_worker_dies_with_a_killed_trainer(fast_overrides):
    args = [*fast_overrides, "rollout.max_staleness=1", "train.steps=10000"]
    trainer = _cli(*_sets(args))
    deadline = time.time() + 300
    workers = []
    while not workers:
        assert trainer.poll() is None, trainer.stdout.read()
        assert time.time() < deadline, "no rollout worker appeared"
        workers = [
            p
            for p in _children(trainer.pid)
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        time.sleep(0.2)
    time.sleep(2)  # let it get to work
    family = _children(trainer.pid)  # the worker and multiprocessing's resource tracker
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in family):
        assert time.time() < deadline, f"processes {family} outlived their trainer"
        time.sleep(0.1)


@pytest.mark.slow
def test_an_error_in_the_worker_stops_the_trainer_with_its_traceback(fast_overrides):
    # a reward term that raises: the trainer saves and stops, as for a synchronous step
    cfg = _cfg(
        fast_overrides,
        "raises",
        "rollout.max_staleness=1",
        "reward.terms=[{fn: 'support:reward_that_raises', weight: 0.1}]",
    )
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(TrainingAbortedError, match="reward_that_raises") as info:
        trainer.fit()
    worker_error = info.value.__cause__.__cause__
    assert isinstance(worker_error, RolloutWorkerError)
    assert "ZeroDivisionError" in str(worker_error) and "return 1 / 0" in str(worker_error)
    assert trainer._worker is None and (trainer.run_dir / "checkpoints" / "step-0").exists()
    # any other exception comes back as RolloutWorkerError with the worker's traceback
    cfg = _cfg(
        fast_overrides,
        "escapes",
        "rollout.max_staleness=1",
        "reward.terms=[{fn: 'support:reward_that_escapes', weight: 0.1}]",
    )
    with pytest.raises(RolloutWorkerError, match=r"(?s)sampling step 1.*WorkerBoom.*escaped"):
        Trainer(cfg, progress=False).fit()
    # a worker that dies without a word
    cfg = _cfg(
        fast_overrides,
        "exits",
        "rollout.max_staleness=1",
        "reward.terms=[{fn: 'support:reward_that_exits', weight: 0.1}]",
    )
    with pytest.raises(RolloutWorkerError, match="exited with code 7 before it sent step 1"):
        Trainer(cfg, progress=False).fit()


def test_weight_slots_keep_k_plus_1_versions_and_the_schedule_of_versions():
    assert [behaviour_version(t, 2) for t in range(1, 7)] == [0, 0, 0, 1, 2, 3]
    assert [behaviour_version(t, 0) for t in range(1, 4)] == [0, 1, 2]
    named = [("a", torch.zeros(2, 3)), ("b", torch.zeros(4, dtype=torch.float64))]
    slots = WeightSlots(named, 3)
    assert sorted(str(d) for d in slots.buffers) == ["torch.float32", "torch.float64"]
    for v in range(5):
        slots.write(v, {"a": torch.full((2, 3), float(v)), "b": torch.full((4,), -float(v))})
    assert [float(slots.snapshot(v)["a"][0, 0]) for v in (2, 3, 4)] == [2.0, 3.0, 4.0]
    assert float(slots.snapshot(4)["b"][3]) == -4.0
    out = [("a", torch.empty(2, 3)), ("b", torch.empty(4, dtype=torch.float64))]
    slots.read_into(3, out)
    assert torch.equal(out[0][1], torch.full((2, 3), 3.0))
    assert slots.buffers[torch.float32].is_shared()


@pytest.mark.slow
def test_two_trainer_processes_with_a_worker_each_equal_one_process(tmp_path):
    """Under torchrun every rank runs its own worker over its share of the prompts; the
    parameters reach those of one process with one worker (up to float rounding)."""
    import socket

    from safetensors.torch import load_file

    run = ["model.policy=builtin:tiny-addition", "rollout.prompts_per_step=4",
           "rollout.group_size=4", "task.eval_size=6", "train.eval_samples=1",
           "train.eval_every=0", "train.steps=3", "algo.name=dapo", "algo.num_minibatches=2",
           "algo.micro_batch_size=3", "optim.lr=1e-3", "optim.eps=1e-3",
           "log.tensorboard=false", "rollout.max_staleness=1", f"output_dir={tmp_path}"]  # fmt: skip
    Trainer(load_config(None, [*run, "name=one"]), progress=False).fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={port}", "-m", "seqrl", "train", "--no-progress",
           *_sets([*run, "name=two"])]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6, msg=key)
    one, two = _comparable(tmp_path / "one"), _comparable(tmp_path / "two")
    for r1, r2 in zip(one, two, strict=True):
        for key in ("reward/mean", "train/accuracy", "response_len/max", "eval/greedy_acc"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness_max"] for r in rows if "async/staleness_max" in r] == [0, 1, 1]
