"""DAPO's dynamic sampling over several processes: generate in shares, keep globally, rebalance.

One process (:func:`seqrl.train.sampling.collect_rollout`) generates each generation batch,
keeps the groups with 0 < #correct < G in order, and stops once P are kept. Here every
generation batch is split into contiguous shares of prompts, one per process; each process
samples (every prompt from its own stream, keyed by its slot in the step, so a prompt's
responses do not depend on the process that draws them) and scores its share, and the scored
groups are gathered in slot order. Every process then sees the generation batch one process
would have made and takes the same keep / stop decisions. The kept groups, in the order one
process keeps them, are finally split into contiguous shares again (sizes differ by at most one
group), so each process trains on its share of exactly the batch one process trains on.

The rollout metrics (``reward/*``, ``response_len/*``, ``sampling/*``) are computed on every
generated response, as in one process, and are the same on every process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from seqrl.train.dist import DistInfo, gather_list, uneven_bounds
from seqrl.train.sampling import (
    SamplingSettings,
    ScoredGroups,
    StepRollout,
    collect_rollout,
    concat_rollouts,
    generate_scored,
    select_groups,
)


def collect_rollout_rebalanced(
    sampler,
    tokenizer,
    task,
    step_examples: list,
    side_examples: Callable[[int, int], list],
    s: SamplingSettings,
    seeds_for: Callable[[list[int]], list[int]],
    dist: DistInfo,
    device: torch.device,
) -> StepRollout:
    """This process's share of the step's kept groups (see the module docstring).

    ``step_examples`` are the step's P prompts (all of them, not a share); ``seeds_for(slots)``
    the sampling seed of each prompt slot of the step (step prompt i is slot i, side prompt k
    is slot P + k), as in one process. The batch is returned on ``device``.
    """

    def generate(examples: list, slots: list[int]) -> ScoredGroups:
        """This process scores its share of the generation batch; every process gets all."""
        lo, hi = uneven_bounds(len(examples), dist)
        mine = None  # fewer prompts than processes: this one has none
        if hi > lo:
            seeds = seeds_for(slots[lo:hi])
            mine = generate_scored(sampler, tokenizer, task, examples[lo:hi], s, seeds)
        return gather_groups(mine, dist, tokenizer.pad_token_id, device)

    whole = collect_rollout(
        sampler, tokenizer, task, step_examples, side_examples, s, seeds_for, generate=generate
    )
    return share(whole, dist)


def gather_groups(
    mine: ScoredGroups | None, dist: DistInfo, pad_token_id: int, device: torch.device
) -> ScoredGroups:
    """Every process's scored groups (None: it had no prompt), in rank order, batch on ``device``."""
    cpu = None if mine is None else dataclasses.replace(mine, batch=_to(mine.batch, "cpu"))
    parts = [p for p in gather_list([cpu], dist) if p is not None]  # in rank order
    return ScoredGroups(
        [e for p in parts for e in p.examples],
        _to(concat_rollouts([p.batch for p in parts], pad_token_id), device),
        [t for p in parts for t in p.texts],
        torch.cat([p.correct for p in parts]),
        torch.cat([p.terms for p in parts], dim=1),
        torch.cat([p.scores for p in parts]),
    )


def share(rollout: StepRollout, dist: DistInfo) -> StepRollout:
    """This process's contiguous share of the rollout's groups (shares differ by at most one)."""
    G = rollout.batch.group_size
    lo, hi = uneven_bounds(len(rollout.examples), dist)
    keep = torch.zeros(len(rollout.examples), dtype=torch.bool)
    keep[lo:hi] = True
    rows = slice(lo * G, hi * G)
    return dataclasses.replace(
        rollout,
        examples=rollout.examples[lo:hi],
        batch=select_groups(rollout.batch, keep.to(rollout.batch.response_ids.device)),
        texts=rollout.texts[rows],
        rewards=rollout.rewards[rows],
        correct=rollout.correct[rows],
        terms=None if rollout.terms is None else rollout.terms[:, rows],
        scores=None if rollout.scores is None else rollout.scores[rows],
    )


def _to(batch, device):
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return type(batch)(
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
    )
