"""Supervised warm start: teach a model the task's answer format so that RL starts from a policy
that is sometimes right (RL from a policy that never succeeds has nothing to reinforce).

Cross-entropy on the completion tokens only (prompt tokens are context), EOS appended.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from rich.console import Console

from seqrl.models import save_policy
from seqrl.rollout import HFSampler
from seqrl.train.sampling import score_rollout


@dataclass(frozen=True)
class SFTSettings:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    train_size: int = 20000
    eval_size: int = 200
    log_every: int = 50
    teacher_slip_rate: float = 0.0  # P(a demonstration is the task's typical mistake instead)


def encode_sft_batch(tokenizer, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (−100 on prompt and padding): [b, L]."""
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + t, [-100] * len(p) + t))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def sft_targets(task, examples, rng: random.Random, slip_rate: float = 0.0) -> list[str]:
    """The completions to imitate: each is :meth:`Task.slip_target` with probability ``slip_rate``.

    An example whose task leaves no room for the slip keeps its correct target. With
    ``slip_rate=0`` no random number is drawn, so the batches match a run without the option.
    """
    targets = []
    for e in examples:
        target = task.sft_target(e)
        if slip_rate and rng.random() < slip_rate:
            target = task.slip_target(e) or target
        targets.append(target)
    return targets


@torch.no_grad()
def greedy_accuracy(
    model, tokenizer, task, examples, *, max_new_tokens: int, chunk: int = 256
) -> float:
    sampler = HFSampler(model, tokenizer, max_new_tokens=max_new_tokens)
    hits = 0
    for s in range(0, len(examples), chunk):
        part = examples[s : s + chunk]
        batch = sampler.generate([e.prompt for e in part], group_size=1, greedy=True)
        hits += score_rollout(tokenizer, task, batch, part)[1].sum().item()
    return hits / max(1, len(examples))


def run_sft(
    model, tokenizer, task, settings: SFTSettings, *, out_dir=None, console: Console | None = None
) -> dict:
    """Train ``model`` in place; save it (and the tokenizer) to ``out_dir`` if given."""
    console = console or Console()
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    train = task.examples("train", min(settings.train_size, task.max_examples("train")))
    if not 0.0 <= settings.teacher_slip_rate <= 1.0:
        raise ValueError(f"teacher_slip_rate must be in [0, 1], got {settings.teacher_slip_rate}")
    if settings.teacher_slip_rate and all(task.slip_target(e) is None for e in train[:1000]):
        raise ValueError(
            f"task {task.name!r} defines no teacher slip (Task.slip_target), so "
            "teacher_slip_rate has nothing to inject; leave it at 0"
        )
    held_out = task.examples("test", settings.eval_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = rng.sample(train, settings.batch_size)
        targets = sft_targets(task, batch, rng, settings.teacher_slip_rate)
        enc = encode_sft_batch(tokenizer, [e.prompt for e in batch], targets)
        loss = model(**{k: v.to(model.device) for k, v in enc.items()}, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            console.print(
                f"sft step {step + 1}/{settings.steps}  loss {loss.item():.4f}  "
                f"{time.perf_counter() - start:.0f}s"
            )
    acc = greedy_accuracy(model, tokenizer, task, held_out, max_new_tokens=task.max_new_tokens)
    console.print(f"held-out greedy accuracy after SFT: {acc:.3f} ({len(held_out)} problems)")
    if out_dir is not None:
        save_policy(model, tokenizer, out_dir)
        console.print(f"saved to {out_dir}")
    return {"loss": loss.item(), "greedy_acc": acc, "seconds": time.perf_counter() - start}
