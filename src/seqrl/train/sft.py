"""Supervised warm start: teach a model the task's answer format so that RL starts from a policy
that is sometimes right (RL from a policy that never succeeds has nothing to reinforce).

Cross-entropy on the completion tokens only (prompt tokens are context), EOS appended: the
layout of :mod:`seqrl.tasks.prompts`, exactly what the rollout samples after the same prompt.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from rich.console import Console

from seqrl.evaluation import group_means
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
    # P(a demonstration is only the final answer, Task.direct_target: no worked steps), and
    # P(such a direct answer is the slip's answer): a teacher that answers in its head and then
    # forgets carries. Worked demonstrations slip at teacher_slip_rate only.
    direct_answer_rate: float = 0.0
    direct_slip_rate: float = 0.0


def encode_sft_batch(tokenizer, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (−100 on prompt and padding): [b, L].

    Each row is ``tokenizer(prompt) + tokenizer(target) + [EOS]``, no special tokens added by the
    tokenizer: the prompt tokens are those the rollout feeds the policy (``encode_prompts``).
    """
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


def sft_targets(
    task,
    examples,
    rng: random.Random,
    slip_rate: float = 0.0,
    direct_rate: float = 0.0,
    direct_slip_rate: float = 0.0,
) -> list[str]:
    """The completions to imitate: each is :meth:`Task.slip_target` with probability ``slip_rate``.

    With ``direct_rate``, a demonstration is first, with that probability, a direct answer:
    :meth:`Task.direct_target` of the correct completion, or of the slip with probability
    ``direct_slip_rate``. An example whose task leaves no room for the slip keeps its correct
    target. A rate of 0 draws no random number, so the batches match a run without the option.
    """
    targets = []
    for e in examples:
        target = task.sft_target(e)
        direct = bool(direct_rate) and rng.random() < direct_rate
        rate = direct_slip_rate if direct else slip_rate
        if rate and rng.random() < rate:
            target = task.slip_target(e) or target
        targets.append(task.direct_target(target) if direct else target)
    return targets


@torch.no_grad()
def greedy_scores(
    model, tokenizer, task, examples, *, max_new_tokens: int, chunk: int = 256
) -> torch.Tensor:
    """The verifier's score of each example's greedy response, [len(examples)] float64."""
    sampler = HFSampler(model, tokenizer, max_new_tokens=max_new_tokens)
    scores = [torch.zeros(0, dtype=torch.float64)]
    for s in range(0, len(examples), chunk):
        part = examples[s : s + chunk]
        batch = sampler.generate([e.prompt for e in part], group_size=1, greedy=True)
        scores.append(score_rollout(tokenizer, task, batch, part)[1])
    return torch.cat(scores)


def greedy_accuracy(
    model, tokenizer, task, examples, *, max_new_tokens: int, chunk: int = 256
) -> float:
    """The mean of :func:`greedy_scores` (0 for no examples)."""
    scores = greedy_scores(
        model, tokenizer, task, examples, max_new_tokens=max_new_tokens, chunk=chunk
    )
    return scores.sum().item() / max(1, len(examples))


def run_sft(
    model,
    tokenizer,
    task,
    settings: SFTSettings,
    *,
    out_dir=None,
    console: Console | None = None,
    train_examples: list | None = None,
    eval_examples: list | None = None,
    max_new_tokens: int | None = None,
    group_by: str | None = None,
) -> dict:
    """Train ``model`` in place; save it (and the tokenizer) to ``out_dir`` if given.

    The examples default to the task's train split and the first ``settings.eval_size`` of its
    test split; give them to train on prompts as the policy sees them (``build_task_data``).
    Held-out greedy accuracy is measured before and after (per ``group_by`` value too).
    Returns ``{"loss", "greedy_acc_start", "greedy_acc", "seconds"}`` (+ ``"greedy_acc/<v>"``).
    """
    console = console or Console()
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    if train_examples is not None:
        train = list(train_examples)
    else:
        train = task.examples("train", min(settings.train_size, task.max_examples("train")))
    for name in ("teacher_slip_rate", "direct_answer_rate", "direct_slip_rate"):
        if not 0.0 <= getattr(settings, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(settings, name)}")
    slips = settings.teacher_slip_rate or (
        settings.direct_answer_rate and settings.direct_slip_rate
    )
    if slips and all(task.slip_target(e) is None for e in train[:1000]):
        raise ValueError(
            f"task {task.name!r} defines no teacher slip (Task.slip_target), so "
            "teacher_slip_rate / direct_slip_rate have nothing to inject; leave them at 0"
        )
    if settings.direct_answer_rate and task.direct_target(task.sft_target(train[0])) is None:
        raise ValueError(
            f"task {task.name!r} has no direct answer form (Task.direct_target: the scratchpad "
            "task has), so direct_answer_rate has nothing to cut; leave it at 0"
        )
    if eval_examples is not None:
        held_out = list(eval_examples)
    else:
        held_out = task.examples("test", settings.eval_size)
    if settings.batch_size > len(train):
        raise ValueError(
            f"batch_size {settings.batch_size} is larger than the {len(train)} training "
            f"problems; use --batch-size {len(train)} or less"
        )
    budget = max_new_tokens or task.max_new_tokens

    def held_out_accuracy(when: str) -> dict[str, float]:
        scores = greedy_scores(model, tokenizer, task, held_out, max_new_tokens=budget)
        acc = {"greedy_acc": scores.mean().item() if len(held_out) else float("nan")}
        if group_by:
            acc |= {
                f"greedy_acc/{k}": v for k, v in group_means(scores, held_out, group_by).items()
            }
        console.print(
            f"held-out greedy accuracy {when} SFT: {acc['greedy_acc']:.3f} "
            f"({len(held_out)} problems)"
        )
        if group_by:
            groups = "  ".join(f"{k[11:]} {v:.3f}" for k, v in acc.items() if "/" in k)
            console.print(f"  by {group_by}: {groups}")
        return acc

    start_acc = held_out_accuracy("before")
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
        targets = sft_targets(
            task,
            batch,
            rng,
            settings.teacher_slip_rate,
            settings.direct_answer_rate,
            settings.direct_slip_rate,
        )
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
    end_acc = held_out_accuracy("after")
    if out_dir is not None:
        save_policy(model, tokenizer, out_dir)
        console.print(f"saved to {out_dir}")
    return {
        "loss": loss.item(),
        "greedy_acc_start": start_acc["greedy_acc"],
        **end_acc,
        "seconds": time.perf_counter() - start,
    }


def sft_from_config(
    cfg, settings: SFTSettings, *, out_dir=None, console: Console | None = None
) -> dict:
    """:func:`run_sft` of ``cfg.model.policy`` on ``cfg.task``'s problems, the prompts rendered
    as the RL run of the same config renders them (``build_task_data``): ``seqrl sft CONFIG``."""
    from seqrl.models import load_policy
    from seqrl.train.builders import build_task_data

    policy, tokenizer = load_policy(cfg.model.policy)
    task, train, test = build_task_data(cfg, tokenizer)
    return run_sft(
        policy,
        tokenizer,
        task,
        settings,
        out_dir=out_dir,
        console=console,
        train_examples=train,
        eval_examples=test,
        max_new_tokens=cfg.rollout.max_new_tokens,
        group_by=cfg.task.group_by,
    )
