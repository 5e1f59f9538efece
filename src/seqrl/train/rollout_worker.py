"""Asynchronous rollouts with bounded staleness: a rollout worker process and its weight channel.

    trainer (this process)                        rollout worker (own process, one thread)
    publish the current version           ──────► for s = first … train.steps:
    for t = first … train.steps:                      v = max(0, s − 1 − k)
        rollout = take(t)                 ◄─ s ──     wait until version v is published
        update on it (π_prox = θ now)                 load version v, sample step s with it
        publish version t                 ──────►     send (s, v, rollout)

Version v is the policy after v RL steps, so the synchronous loop samples step t with version
t − 1. With ``rollout.max_staleness`` = k the worker samples step t with exactly version
max(0, t − 1 − k): it waits when it is ahead, and the trainer waits when the batch is not ready.
A step's batch therefore depends on its step number and the seed alone, never on timing: a
run is reproducible, resumes exactly, and equals a synchronous loop that samples with weights k
steps old (``tests/train/test_async.py`` builds that loop). While the trainer updates on step t
the worker may already sample steps t + 1 … t + k, whose versions t − k … t − 1 exist.

Weights go through shared memory: k + 1 slots of the trainable parameters, version v in slot
v mod (k + 1). The worker copies version v out before it samples step v + 1 + k, and the
trainer rewrites that slot (with version v + k + 1) only after it has trained on that step, so a
slot is never rewritten while it may still be read. Frozen weights (the base model under LoRA)
and buffers never change: the worker builds them from the same config. Batches come back
pickled through a pipe, with the version that sampled them; an MoE policy's routing in the
worker is μ's and is not recorded (Routing Replay replays π_prox's, recorded by the trainer).

The worker runs one thread, dies with the trainer (``PR_SET_PDEATHSIG`` on Linux, and a look at
the parent in every wait), and an exception in it is raised in the trainer with its traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import pickle
import queue
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor

from seqrl.tasks.rewards import RewardFunctionError
from seqrl.train.dist import SINGLE, DistInfo
from seqrl.train.sampling import StepRollout

_POLL_S = 0.5  # how often a wait looks at the other process


class RolloutWorkerError(RuntimeError):
    """The rollout worker failed or exited; the message carries the worker's traceback."""


def trainable(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """The parameters a policy update changes (all of them, or the LoRA adapters), in order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class WeightSlots:
    """``n`` versions of a model's trainable parameters in shared memory.

    One flat buffer per dtype, [n, numel]; version v lives in slot v mod n. The buffers are
    created by the trainer and handed to the worker when it starts (they are not copied).
    """

    def __init__(self, named: list[tuple[str, Tensor]], n: int) -> None:
        sizes: dict[torch.dtype, int] = {}
        self.layout: list[tuple[str, torch.dtype, int, tuple[int, ...]]] = []
        for name, p in named:
            offset = sizes.get(p.dtype, 0)
            self.layout.append((name, p.dtype, offset, tuple(p.shape)))
            sizes[p.dtype] = offset + p.numel()
        self.n = n
        self.buffers = {
            dtype: torch.zeros(n, size, dtype=dtype).share_memory_()
            for dtype, size in sizes.items()
        }  # dtype → [n, numel]

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.layout]

    def views(self, version: int) -> dict[str, Tensor]:
        """name → the slot's tensor of that parameter (a view into shared memory)."""
        slot = version % self.n
        return {
            name: self.buffers[dtype][slot, offset : offset + math.prod(shape)].view(shape)
            for name, dtype, offset, shape in self.layout
        }

    def write(self, version: int, named: list[tuple[str, Tensor]] | dict[str, Tensor]) -> None:
        """Copy the parameters into the version's slot (a sharded DTensor is gathered whole)."""
        values = dict(named)
        with torch.no_grad():
            for name, view in self.views(version).items():
                value = values[name].detach()
                if hasattr(value, "full_tensor"):  # FSDP2: every rank gathers, in the same order
                    value = value.full_tensor()
                view.copy_(value)

    def read_into(self, version: int, named: list[tuple[str, Tensor]]) -> None:
        views = self.views(version)
        with torch.no_grad():
            for name, p in named:
                p.copy_(views[name])

    def snapshot(self, version: int) -> dict[str, Tensor]:
        """A private copy of the slot (for a checkpoint)."""
        return {name: view.clone() for name, view in self.views(version).items()}


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker process needs to rebuild the trainer's sampler, data and task."""

    cfg: object  # the RunConfig (the worker builds its sampler and data from it)
    dist: DistInfo  # the trainer's rank: its share of each step's prompts
    device: str
    run_dir: str
    first_step: int  # the first step to sample (the trainer holds version first_step − 1)
    last_step: int
    max_staleness: int  # k


def behaviour_version(step: int, max_staleness: int) -> int:
    """The policy version that samples step ``step``: max(0, step − 1 − k)."""
    return max(0, step - 1 - max_staleness)


class RolloutWorker:
    """The trainer's end of the rollout worker: start it, publish weights, take batches, stop it.

    ``versions`` holds the older policy versions the first steps need (max(0, c − k) … c − 1,
    c = ``spec.first_step − 1``, from a checkpoint); version c is ``model`` itself.
    """

    def __init__(self, spec: WorkerSpec, model: torch.nn.Module, versions: dict) -> None:
        k, current = spec.max_staleness, spec.first_step - 1
        self.spec, self.params = spec, trainable(model)
        self.slots = WeightSlots(self.params, k + 1)
        for v in range(max(0, current - k), current):
            if v not in versions:
                raise ValueError(
                    f"the checkpoint of step {current} holds no policy version {v}, which the "
                    f"rollout worker needs to sample step {v + 1 + k} with rollout.max_staleness="
                    f"{k}; it was written with a smaller rollout.max_staleness"
                )
            self.slots.write(v, versions[v])
        self.slots.write(current, self.params)
        self.published = current
        self.worker_version = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_worker_main,
            args=(spec, self.slots, self.inbox, self.outbox, self.worker_version),
            name="seqrl-rollout-worker",
            daemon=True,
        )
        self.process.start()
        self.inbox.put(("version", current))

    def publish(self, version: int) -> None:
        """Version ``version`` (the trainable parameters now) goes to the worker."""
        self.slots.write(version, self.params)
        self.inbox.put(("version", version))
        self.published = version

    def take(self, step: int) -> StepRollout:
        """Step ``step``'s rollout, sampled by version max(0, step − 1 − k); ``async/*`` metrics."""
        t0 = time.perf_counter()
        message = self._receive(step)
        waited = time.perf_counter() - t0
        if message[0] == "error":
            _, failed_step, trace, pickled = message
            where = "starting" if failed_step is None else f"sampling step {failed_step}"
            cause = RolloutWorkerError(
                f"the rollout worker failed while {where}:\n{trace.rstrip()}"
            )
            original = _unpickle(pickled)
            if isinstance(original, RewardFunctionError):  # the trainer saves and stops
                raise original from cause
            raise cause
        _, sent_step, payload, worker_wait, worker_rollout = message
        if sent_step != step:
            raise RolloutWorkerError(f"expected the batch of step {step}, got step {sent_step}")
        rollout: StepRollout = pickle.loads(payload)
        lag = (step - 1 - rollout.versions).double()  # [B] versions behind θ at the step's start
        if lag.numel() and lag.max() > self.spec.max_staleness:  # the invariant, checked
            raise RolloutWorkerError(f"step {step} got samples {int(lag.max())} versions old")
        metrics = {
            "async/staleness_mean": lag.mean().item() if lag.numel() else 0.0,
            "async/staleness_max": lag.max().item() if lag.numel() else 0.0,
            "async/version_lag": float(self.published - int(self.worker_version[0])),
            "async/trainer_wait_s": waited,
            "async/worker_wait_s": worker_wait,
            "async/worker_rollout_s": worker_rollout,
        }
        return replace(rollout, metrics=rollout.metrics | metrics)

    def saved_versions(self, current: int) -> dict[int, dict[str, Tensor]]:
        """The older versions a resume at step ``current`` needs: max(0, current − k) … current − 1."""
        k = self.spec.max_staleness
        return {v: self.slots.snapshot(v) for v in range(max(0, current - k), current)}

    def close(self) -> None:
        """Stop the worker (a batch it is sampling is dropped) and wait for it to exit."""
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            self.inbox.put(("stop",))
        deadline = time.monotonic() + 10
        while self.process.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty, OSError, EOFError):
                self.outbox.get(timeout=0.1)  # unread batches would keep it from exiting
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        for q in (self.inbox, self.outbox):
            q.cancel_join_thread()
            q.close()
        self.process = None

    def _receive(self, step: int) -> tuple:
        while True:
            try:
                return self.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                if self.process.is_alive():
                    continue
            try:  # it exited: a last message may still be in the pipe
                return self.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                raise RolloutWorkerError(
                    f"the rollout worker (pid {self.process.pid}) exited with code "
                    f"{self.process.exitcode} before it sent step {step}"
                ) from None


# ------------------------------------------------------------------ the worker process


def _worker_main(spec: WorkerSpec, slots: WeightSlots, inbox, outbox, worker_version) -> None:
    """The worker: sample steps first … last, each with exactly its version of the weights."""
    _die_with_parent()
    torch.set_num_threads(1)
    step = None
    try:
        parts = _build(spec)
        params = trainable(parts["model"])
        if [name for name, _ in params] != slots.names:
            raise RuntimeError(
                "the rollout worker's policy has other trainable parameters than the trainer's"
            )
        published, loaded = -1, None
        for step in range(spec.first_step, spec.last_step + 1):
            version = behaviour_version(step, spec.max_staleness)
            t0 = time.perf_counter()
            while published < version:
                message = _next_message(inbox)
                if message[0] == "stop":
                    return
                published = max(published, message[1])
            waited = time.perf_counter() - t0
            if loaded != version:
                slots.read_into(version, params)
                parts["sampler"].sync_weights()
                loaded = version
                worker_version[0] = version
            t0 = time.perf_counter()
            rollout = parts["collect"](step)
            rows = len(rollout.texts)
            rollout = replace(rollout, versions=torch.full((rows,), version, dtype=torch.int64))
            outbox.put(("rollout", step, pickle.dumps(rollout), waited, time.perf_counter() - t0))
    except BaseException as err:
        outbox.put(("error", step, traceback.format_exc(), _pickled(err)))
        outbox.close()
        outbox.join_thread()  # the message is in the pipe before the process exits


def _build(spec: WorkerSpec) -> dict:
    """The trainer's policy (its structure; weights come from the slots), sampler and data."""
    from seqrl.train import builders as B
    from seqrl.train.sampling import PromptOrder, collect_step

    cfg = spec.cfg
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(spec.device)
    model, tokenizer = B.build_policy(cfg, device, SINGLE)
    model, _ = B.add_lora(cfg, model, None, cfg.resolved_loss(), SINGLE)
    task, train_examples, _ = B.build_task_data(cfg, tokenizer)
    max_new_tokens = cfg.rollout.max_new_tokens or task.max_new_tokens
    sampler = B.build_sampler(
        cfg,
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        device=device,
        run_dir=Path(spec.run_dir),
        dist=spec.dist,
    )
    settings = B.sampling_settings(cfg, task, max_new_tokens)
    prompts = PromptOrder(
        train_examples, prompts_per_step=cfg.rollout.prompts_per_step, seed=cfg.seed, dist=spec.dist
    )
    remax = cfg.algo.advantage == "remax"

    def collect(step: int) -> StepRollout:
        return collect_step(
            sampler, tokenizer, task, prompts, settings, step, greedy_baseline_too=remax
        )

    return {"model": model, "sampler": sampler, "collect": collect}


def _next_message(inbox) -> tuple:
    """The trainer's next message; exits quietly when the trainer is gone."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            return inbox.get(timeout=_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the trainer dies (elsewhere: the waits check)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():  # it died before prctl took effect
        os._exit(0)


def _pickled(err: BaseException) -> bytes | None:
    try:
        return pickle.dumps(err)
    except Exception:
        return None


def _unpickle(data: bytes | None) -> BaseException | None:
    if data is None:
        return None
    try:
        return pickle.loads(data)
    except Exception:
        return None
