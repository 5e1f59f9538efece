"""The data side of one RL step: which prompts, rollouts, scores, DAPO's dynamic sampling and shaping.

    generation batch 1: the step's P prompts from the seeded data order (:class:`PromptOrder`)
                        (+ side-stream prompts up to ``gen_batch_prompts``)
        → sample G responses each → score → keep groups with 0 < #correct < G
    generation batch k ≥ 2: ``gen_batch_prompts`` more prompts from the side stream
        … until P groups are kept (extra ones are cut) or ``max_gen_batches`` batches were
        generated (then the step trains on the groups it has, and logs that it fell short)
    → rewards: the verifier's score if correct (> 0) else ``incorrect``, plus the soft overlong
      penalty (DAPO Eq. 13); the built-in verifiers score 1 or 0
    → overlong filtering: truncated responses leave the loss (their mask is switched off)

The side stream of step s is a seeded permutation of the training set keyed by (seed, s), so
the prompts of every generation batch follow from the step number alone: a resumed run draws
exactly the prompts an uninterrupted one would (no data position to checkpoint).

Without dynamic sampling this is one generation batch of the step's P prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.rollout import RolloutBatch
from seqrl.tasks.rewards import RewardTerm, term_rewards
from seqrl.train.dist import SINGLE, DistInfo, shard
from seqrl.train.metrics import quantiles


@dataclass(frozen=True)
class SamplingSettings:
    """The parts of the run config the data side needs (no config object enters this module)."""

    group_size: int  # G
    prompts_per_step: int  # P, groups trained on per step
    max_new_tokens: int  # the generation budget L_max
    dynamic: bool = False  # DAPO dynamic sampling
    gen_batch_prompts: int | None = None  # prompts per generation batch; None = P
    max_gen_batches: int = 10
    incorrect_reward: float = 0.0
    overlong_buffer: int | None = None  # L_cache of the soft punishment; None = off
    overlong_penalty_factor: float = 1.0
    overlong_filter: bool = False
    reward_terms: tuple[RewardTerm, ...] = ()  # extra weighted terms (format, user functions)


@dataclass(frozen=True)
class StepRollout:
    """What one step trains on, and what it saw on the way."""

    examples: list  # P' ≤ P prompts (kept groups)
    batch: RolloutBatch  # P'·G rows; with overlong filtering, truncated rows are masked out
    texts: list[str]  # [P'·G] decoded responses
    rewards: Tensor  # [P'·G] shaped rewards
    correct: Tensor  # [P'·G] bool
    metrics: dict[str, float]  # over every response generated in the step, + sampling/*
    terms: Tensor | None = None  # [n_terms, P'·G] weighted extra reward terms
    greedy_rewards: Tensor | None = None  # [P'] ReMax's baseline: the greedy responses' rewards
    scores: Tensor | None = None  # [P'·G] the verifier's values (correct = score > 0)
    versions: Tensor | None = None  # [P'·G] policy version that sampled each row (async rollouts)


def stream_seed(*parts: int) -> int:
    """A sampling-stream seed from integers (run seed, step, prompt slot, ...): stable everywhere."""
    out = 0
    for part in parts:
        out = (out * 1_000_003 + part + 7_919) % (2**61 - 1)
    return out


class PromptOrder:
    """Which prompts step ``s`` trains on, and the seed of each prompt's sampling stream.

    Both follow from (run seed, step) alone: the step's P prompts are the next P of epochs of
    seeded shuffles of the training set, the extra prompts of dynamic sampling come from the
    step's :func:`side_stream`, and prompt slot k of step s samples from stream (seed, s, k). A
    resumed run therefore draws exactly what an uninterrupted one would, with nothing to save.
    Under ``torchrun`` each rank takes a contiguous share of the P prompts, and slots are
    numbered globally, so a prompt's responses do not depend on the number of processes.
    """

    def __init__(
        self, examples: list, *, prompts_per_step: int, seed: int, dist: DistInfo = SINGLE
    ) -> None:
        self.examples, self.P, self.seed, self.dist = examples, prompts_per_step, seed, dist
        self._order, self._order_epoch = None, None  # cached shuffle of the current data epoch

    def step_examples(self, step: int) -> list:
        """This rank's share of the P examples of RL step ``step`` (1-based)."""
        N = len(self.examples)
        picked = []
        for i in range((step - 1) * self.P, step * self.P):
            epoch, pos = divmod(i, N)
            picked.append(self.examples[int(self._epoch_order(epoch)[pos])])
        return shard(picked, self.dist)

    def side_examples(self, step: int) -> Callable[[int, int], list]:
        """``(start, count)`` → examples start … start + count − 1 of the step's side stream."""
        side = None

        def take(start: int, count: int) -> list:
            nonlocal side
            if side is None:
                side = side_stream(len(self.examples), seed=self.seed, step=step)
            return [self.examples[int(side[i % len(side)])] for i in range(start, start + count)]

        return take

    def seeds_for(self, step: int) -> Callable[[list[int]], list[int]]:
        """Prompt slots of this rank → sampling seeds (step prompts first, then side prompts)."""
        P_local = self.P // self.dist.world_size

        def seeds(slots: list[int]) -> list[int]:
            out = []
            for slot in slots:
                if slot < P_local:
                    slot += self.dist.rank * P_local
                else:  # side-stream prompts (dynamic sampling, one process only)
                    slot += self.P - P_local
                out.append(stream_seed(self.seed, step, slot))
            return out

        return seeds

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._order_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=gen)
            self._order_epoch = epoch
        return self._order


def score_rollout(tokenizer, task, batch: RolloutBatch, examples: list) -> tuple[list[str], Tensor]:
    """Decode the responses and score each against its prompt's example: (texts, scores [B]).

    ``examples`` has one entry per prompt; row i of the batch belongs to examples[i // G].
    """
    texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    grouped = [e for e in examples for _ in range(batch.group_size)]
    return texts, torch.tensor(task.score_batch(texts, grouped), dtype=torch.float64)


def side_stream(n_examples: int, *, seed: int, step: int) -> Tensor:
    """The extra-prompt order of step ``step``: a permutation of the training set [N]."""
    gen = torch.Generator().manual_seed(seed * 1_000_033 + 7_919 * step + 17)
    return torch.randperm(n_examples, generator=gen)


def shaped_rewards(
    correct: Tensor,
    lengths: Tensor,
    s: SamplingSettings,
    terms: Tensor | None = None,
    scores: Tensor | None = None,
) -> Tensor:
    """The verifier's score if correct else ``incorrect_reward``, + the extra terms, + DAPO's
    soft overlong penalty.

    ``correct``, ``lengths`` and ``scores`` (the verifier's values; None = 1 wherever correct,
    which is what the built-in verifiers score) are [B]; ``terms`` is [n_terms, B] of weighted
    term values (see :func:`extra_terms`). Computed in float64, returned in the default dtype.
    """
    one = torch.ones((), dtype=torch.float64, device=correct.device)
    score = one if scores is None else scores.to(one)
    rewards = torch.where(correct, score, one * s.incorrect_reward)  # [B]
    lengths = lengths.to(correct.device)
    if terms is not None and terms.numel():
        rewards = rewards + terms.to(rewards).sum(0)
    if s.overlong_buffer is not None:
        rewards = rewards + C.soft_overlong_penalty(
            lengths.to(torch.float64),
            s.max_new_tokens,
            s.overlong_buffer,
            factor=s.overlong_penalty_factor,
        )
    return rewards.to(torch.get_default_dtype())


def extra_terms(texts: list[str], examples: list, group_size: int, s: SamplingSettings) -> Tensor:
    """The weighted extra reward terms of ``texts`` (row i answers examples[i // G]): [n_terms, B]."""
    grouped = [e for e in examples for _ in range(group_size)]
    return term_rewards(texts, grouped, s.reward_terms)


def greedy_baseline(sampler, tokenizer, task, examples: list, s: SamplingSettings) -> Tensor:
    """ReMax's baseline: the shaped reward of each prompt's greedy response, [P]."""
    greedy = sampler.generate([e.prompt for e in examples], group_size=1, greedy=True)
    texts, scores = score_rollout(tokenizer, task, greedy, examples)
    terms = extra_terms(texts, examples, 1, s)
    return shaped_rewards(scores > 0, greedy.lengths, s, terms, scores)


def point_biserial(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two [B] tensors (point-biserial when one is 0/1); NaN if either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    if x.numel() < 2 or denom.item() == 0.0:
        return float("nan")
    return ((x * y).sum() / denom).item()


def select_groups(batch: RolloutBatch, keep: Tensor) -> RolloutBatch:
    """The rows of the groups where ``keep`` [P] is True (all G rows of each)."""
    rows = keep.repeat_interleave(batch.group_size)  # [B]
    return RolloutBatch(
        batch.prompt_ids[rows],
        batch.prompt_mask[rows],
        batch.response_ids[rows],
        batch.response_mask[rows],
        batch.sampler_logprobs[rows],
        batch.truncated[rows],
        batch.group_size,
    )


def concat_rollouts(batches: Sequence[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """Stack rollouts of different widths: prompts re-padded on the left, responses on the right."""
    if len(batches) == 1:
        return batches[0]
    Lp = max(b.prompt_ids.shape[1] for b in batches)
    T = max(b.response_ids.shape[1] for b in batches)

    def pad(x: Tensor, width: int, value, left: bool) -> Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

    return RolloutBatch(
        torch.cat([pad(b.prompt_ids, Lp, pad_token_id, True) for b in batches]),  # [B, Lp]
        torch.cat([pad(b.prompt_mask, Lp, False, True) for b in batches]),  # [B, Lp]
        torch.cat([pad(b.response_ids, T, pad_token_id, False) for b in batches]),  # [B, T]
        torch.cat([pad(b.response_mask, T, False, False) for b in batches]),  # [B, T]
        torch.cat([pad(b.sampler_logprobs, T, 0.0, False) for b in batches]),  # [B, T]
        torch.cat([b.truncated for b in batches]),  # [B]
        batches[0].group_size,
    )


def rollout_metrics(
    all_correct: Tensor,
    all_lengths: Tensor,
    all_truncated: Tensor,
    s: SamplingSettings,
    all_terms: Tensor | None = None,
    all_scores: Tensor | None = None,
) -> dict[str, float]:
    """reward/*, train/accuracy, train/truncated_frac, response_len/* over every response [n].

    ``all_terms`` [n_terms, n] are the weighted extra reward terms (None: no terms);
    ``all_scores`` [n] the verifier's values (None: 1 wherever correct). Computed on the CPU
    (the lengths and flags may be on the policy's device).
    """
    all_correct, all_lengths, all_truncated = (
        t.cpu() for t in (all_correct, all_lengths, all_truncated)
    )
    all_terms = None if all_terms is None else all_terms.cpu()
    all_scores = None if all_scores is None else all_scores.cpu()
    if all_terms is None:
        all_terms = torch.zeros(len(s.reward_terms), len(all_correct), dtype=torch.float64)
    all_rewards = shaped_rewards(all_correct, all_lengths, s, all_terms, all_scores)
    metrics = {
        "reward/mean": all_rewards.mean().item(),
        "reward/std": all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
        "train/accuracy": all_correct.double().mean().item(),
        "train/truncated_frac": all_truncated.double().mean().item(),
        **quantiles(all_lengths.double(), "response_len"),
        "response_len/corr_with_correct": point_biserial(all_lengths, all_correct),
        "response_len/corr_with_reward": point_biserial(all_lengths, all_rewards),
    }
    if s.overlong_buffer is not None:
        metrics["reward/overlong_penalty_mean"] = (
            (
                all_rewards
                - shaped_rewards(
                    all_correct, torch.zeros_like(all_lengths), s, all_terms, all_scores
                )
            )
            .mean()
            .item()
        )
    for term, values in zip(s.reward_terms, all_terms, strict=True):
        metrics[f"reward/term/{term.name}"] = values.mean().item()  # weighted, over all rows
    return metrics


@dataclass(frozen=True)
class ScoredGroups:
    """One generation batch, decoded and scored: n prompts × G responses, b = n·G rows."""

    examples: list  # [n]
    batch: RolloutBatch  # b rows
    texts: list[str]  # [b]
    correct: Tensor  # [b] bool
    terms: Tensor  # [n_terms, b] weighted extra reward terms
    scores: Tensor  # [b] the verifier's values (correct = score > 0)

    def select(self, take: Tensor) -> ScoredGroups:
        """The groups where ``take`` [n] is True."""
        rows = take.repeat_interleave(self.batch.group_size)  # [b]
        return ScoredGroups(
            [e for e, t in zip(self.examples, take.tolist(), strict=True) if t],
            select_groups(self.batch, take),
            [t for t, r in zip(self.texts, rows.tolist(), strict=True) if r],
            self.correct[rows],
            self.terms[:, rows],
            self.scores[rows],
        )


def generate_scored(
    sampler, tokenizer, task, examples: list, s: SamplingSettings, seeds: list[int] | None
) -> ScoredGroups:
    """Sample G responses for each example (from its stream when ``seeds``) and score them."""
    kwargs = {} if seeds is None else {"seeds": seeds}
    batch = sampler.generate([e.prompt for e in examples], group_size=s.group_size, **kwargs)
    texts, scores = score_rollout(tokenizer, task, batch, examples)
    terms = extra_terms(texts, examples, batch.group_size, s)  # [n_terms, b]
    return ScoredGroups(examples, batch, texts, scores > 0, terms, scores)


def collect_rollout(
    sampler,
    tokenizer,
    task,
    step_examples: list,
    side_examples: Callable[[int, int], list],
    s: SamplingSettings,
    seeds_for: Callable[[list[int]], list[int]] | None = None,
    *,
    generate: Callable[[list, list[int]], ScoredGroups] | None = None,
) -> StepRollout:
    """Generate, score and (with dynamic sampling) filter the groups of one step.

    ``step_examples`` are the step's P prompts; ``side_examples(start, count)`` returns
    prompts ``start … start + count − 1`` of the step's side stream. ``seeds_for(slots)``
    gives the sampling seed of each prompt slot (step prompt i is slot i, side prompt k is
    slot P + k), so every group draws from its own random stream; None uses torch's global one.
    ``generate(examples, slots)`` makes one scored generation batch (default: here, with
    :func:`generate_scored`; :mod:`seqrl.train.rebalance` shares it between processes).
    """
    if generate is None:

        def generate(examples: list, slots: list[int]) -> ScoredGroups:
            seeds = None if seeds_for is None else seeds_for(slots)
            return generate_scored(sampler, tokenizer, task, examples, s, seeds)

    P = len(step_examples)
    per_batch = (s.gen_batch_prompts or P) if s.dynamic else P
    seen: list[ScoredGroups] = []  # every generation batch
    kept: list[ScoredGroups] = []  # the groups trained on, per generation batch
    n_kept, n_dropped, side_used = 0, 0, 0
    while len(seen) < (s.max_gen_batches if s.dynamic else 1):
        examples = list(step_examples) if not seen else []
        slots = list(range(len(examples)))
        extra = per_batch - len(examples)
        if extra > 0:
            examples += side_examples(side_used, extra)
            slots += [P + side_used + k for k in range(extra)]
            side_used += extra
        part = generate(examples, slots)
        seen.append(part)
        if s.dynamic:
            keep = C.mixed_group_mask(part.correct, part.batch.group_size)  # [n]
        else:
            keep = torch.ones(len(examples), dtype=torch.bool)
        n_dropped += int((~keep).sum())
        take = keep & (keep.cumsum(0) <= P - n_kept)  # never more than P groups in all
        if take.all():
            kept.append(part)
        elif take.any():
            kept.append(part.select(take))
        n_kept += int(take.sum())
        if n_kept >= P:
            break
    return _step_rollout(kept, seen, s, P, n_dropped, tokenizer.pad_token_id)


def collect_step(
    sampler,
    tokenizer,
    task,
    prompts: PromptOrder,
    s: SamplingSettings,
    step: int,
    *,
    greedy_baseline_too: bool = False,
) -> StepRollout:
    """Step ``step``'s rollout from its prompts and streams; with ReMax's greedy baseline.

    The same function samples in the trainer (synchronous) and in the rollout worker
    (:mod:`seqrl.train.rollout_worker`): a step's batch depends on the step number and the
    sampler's weights only.
    """
    rollout = collect_rollout(
        sampler,
        tokenizer,
        task,
        prompts.step_examples(step),
        prompts.side_examples(step),
        s,
        seeds_for=prompts.seeds_for(step),
    )
    return (
        with_greedy_baseline(rollout, sampler, tokenizer, task, s)
        if greedy_baseline_too
        else rollout
    )


def with_greedy_baseline(rollout: StepRollout, sampler, tokenizer, task, s) -> StepRollout:
    """``rollout`` with ReMax's baseline: the reward of each kept prompt's greedy response."""
    if not rollout.examples:
        return rollout
    greedy = greedy_baseline(sampler, tokenizer, task, rollout.examples, s)
    return dataclasses.replace(rollout, greedy_rewards=greedy.to(rollout.rewards.device))


def with_logprob_noise(rollout: StepRollout, std: float, generator: torch.Generator) -> StepRollout:
    """``rollout`` with N(0, std²) added to every sampled token's log μ (``rollout.logprob_noise``).

    A testbed for GSPO §5.4 (an inference engine whose log-probs differ from the trainer's): the
    samples are unchanged, only the log-probs the sampler reports are perturbed, i.i.d. per token,
    and the padding keeps its 0. ``generator`` (CPU) makes the noise a function of the run's seed
    and step, so runs and resumes stay exact.
    """
    if std == 0:
        return rollout
    lp = rollout.batch.sampler_logprobs  # [B, T]
    noise = torch.randn(lp.shape, generator=generator, dtype=torch.float64) * std  # [B, T]
    noisy = torch.where(rollout.batch.response_mask, lp + noise.to(lp), lp)
    return dataclasses.replace(
        rollout, batch=dataclasses.replace(rollout.batch, sampler_logprobs=noisy)
    )


def _step_rollout(
    kept: list[ScoredGroups],
    seen: list[ScoredGroups],
    s: SamplingSettings,
    P: int,
    n_dropped: int,
    pad_token_id: int,
) -> StepRollout:
    """The kept groups as one batch with shaped rewards; metrics over everything generated."""
    if not kept:  # every group was dropped: an empty batch, and the step makes no update
        empty = torch.zeros(len(seen[-1].examples), dtype=torch.bool)
        kept = [seen[-1].select(empty)]
    examples = [e for part in kept for e in part.examples]
    texts = [t for part in kept for t in part.texts]
    batch = concat_rollouts([part.batch for part in kept], pad_token_id)
    correct = torch.cat([part.correct for part in kept])
    terms = torch.cat([part.terms for part in kept], dim=1)
    scores = torch.cat([part.scores for part in kept])
    rewards = shaped_rewards(correct, batch.lengths, s, terms, scores)  # [P'·G]
    # the reward side on the policy's device, beside the batch (advantages meet log-probs there)
    device = batch.response_ids.device
    rewards, correct, terms, scores = (t.to(device) for t in (rewards, correct, terms, scores))

    metrics = rollout_metrics(
        torch.cat([part.correct for part in seen]),
        torch.cat([part.batch.lengths for part in seen]),
        torch.cat([part.batch.truncated for part in seen]),
        s,
        torch.cat([part.terms for part in seen], dim=1),
        torch.cat([part.scores for part in seen]),
    )
    if s.dynamic:
        metrics |= {
            "sampling/gen_batches": float(len(seen)),
            "sampling/kept_groups": float(len(examples)),
            "sampling/dropped_groups": float(n_dropped),
            "sampling/short_of_target": float(P - len(examples)),
        }
    if s.overlong_filter:
        metrics["train/overlong_filtered_frac"] = (
            batch.truncated.double().mean().item() if len(texts) else 0.0
        )
        batch = dataclasses.replace(
            batch, response_mask=C.overlong_filter_mask(batch.response_mask, batch.truncated)
        )
    return StepRollout(examples, batch, texts, rewards, correct, metrics, terms, scores=scores)
