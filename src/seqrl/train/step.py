"""The policy side of one RL step: rewards → advantages → the clipped policy update.

rewards [B] ─► advantages [B]            (group estimators here; critics: seqrl.train.critic)
old log-probs [B, T]                     (recomputed at θ_old, or the sampler's μ)
reference log-probs [B, T]               (for a KL term)
─► optimizer_pass(clipped policy loss)   (seqrl.train.optimize)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.core import PolicyLossConfig
from seqrl.rollout import RolloutBatch
from seqrl.train import sharding
from seqrl.train.dist import SINGLE, DistInfo, mean_metrics
from seqrl.train.forward import batch_logprobs, response_logprobs, row_tokens
from seqrl.train.optimize import PassSettings, optimizer_params, optimizer_pass

__all__ = [
    "UpdateSettings",
    "batch_logprobs",
    "compute_advantages",
    "response_logprobs",
    "update_policy",
]


@dataclass(frozen=True)
class UpdateSettings:
    """The parts of the run config one policy update needs (no config object enters here).

    The loss is resolved once, when the settings are made (``loss``); the name and overrides
    are kept for display and checkpoints.
    """

    loss_name: str
    loss_overrides: dict
    num_minibatches: int
    ppo_epochs: int
    micro_batch_size: int
    grad_clip: float | None  # None: no clipping (the norm is still measured)
    temperature: float
    # correction of π_old / μ (seqrl.core.decoupled_policy_loss): none | truncate | mask
    mismatch_correction: str = "none"
    mismatch_level: str = "token"  # token | sequence | sequence_mean
    mismatch_cap: float = 2.0  # C
    shared_prefix: bool = False  # one prompt forward per group (see shared_prefix_logits)
    packing: bool = False  # padding-free forwards where the model packs exactly (forward.pack)
    max_tokens_per_micro_batch: int | None = None  # token budget per micro-batch; None = rows
    loss: PolicyLossConfig = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        loss = C.resolve_policy_loss_config(self.loss_name, **self.loss_overrides)
        object.__setattr__(self, "loss", loss)

    @property
    def passes(self) -> PassSettings:
        return PassSettings(
            self.num_minibatches,
            self.ppo_epochs,
            self.micro_batch_size,
            self.grad_clip,
            self.max_tokens_per_micro_batch,
        )


def compute_advantages(
    kind: str,
    rewards: Tensor,
    group_size: int,
    *,
    eps: float,
    greedy_rewards: Tensor | None = None,
    kl_penalty: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Advantages for the estimators a config can name: [B], or [B, T] for ReMax with a KL.

    ``kl_penalty`` [B, T] (with ``mask``) is a KL in the reward (:func:`seqrl.core.
    reward_kl_penalty`): the sequence estimators use R − Σ_t p_t (as verl sums token rewards);
    ReMax uses verl's token form, A_t = Σ_{t'≥t} (r_{t'} − p_{t'}) − r(x, ȳ).
    """
    if kl_penalty is not None:
        if mask is None:
            raise ValueError("a KL penalty in the reward needs the response mask")
        if kind == "remax":
            if greedy_rewards is None:
                raise ValueError("remax needs the rewards of the greedy responses")
            token_rewards = C.token_level_rewards(rewards, mask) - kl_penalty.to(rewards)  # [B, T]
            baseline = greedy_rewards.repeat_interleave(group_size).to(rewards)
            return C.remax_advantages(token_rewards, baseline, mask)  # [B, T]
        rewards = rewards - C.masked_sum(kl_penalty.to(rewards), mask, dim=-1)  # [B]
    if kind == "group":
        return C.group_advantages(rewards, group_size, eps=eps)
    if kind == "group_centered":
        return C.group_centered_advantages(rewards, group_size)
    if kind == "rloo":
        return C.rloo_advantages(rewards, group_size)
    if kind == "remax":
        if greedy_rewards is None:
            raise ValueError("remax needs the rewards of the greedy responses")
        return C.remax_advantages(rewards, greedy_rewards.repeat_interleave(group_size))
    raise ValueError(f"unknown advantage estimator {kind!r}")


def update_policy(
    model,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    settings: UpdateSettings,
    generator: torch.Generator,
    dist: DistInfo = SINGLE,
    routing=None,
) -> tuple[dict[str, float], int]:
    """``ppo_epochs`` × ``num_minibatches`` optimizer steps on one rollout.

    Returns (metrics, number of skipped non-finite updates); see
    :func:`seqrl.train.optimize.optimizer_pass` for the minibatch arithmetic (micro-batch size
    and number of processes never change the gradient). Under ``torchrun`` ``batch`` holds this
    rank's rows.

    ``old_logprobs=None`` means a single on-policy update (one minibatch, one epoch): then
    θ = θ_old during the only forward, so π_old is the detached current log-prob, exactly,
    and the separate recompute pass is skipped.

    ``routing`` (MoE policies): the :class:`seqrl.train.routing.RolloutRouting` that recorded
    this rollout's routing in :func:`batch_logprobs`; it replays it (if so configured) and adds
    the ``moe/*`` metrics.
    """
    if old_logprobs is None and settings.num_minibatches * settings.ppo_epochs != 1:
        raise ValueError("old_logprobs may only be omitted for a single on-policy update")
    loss_fn = functools.partial(
        micro_batch_loss,
        model,
        batch,
        advantages=advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        settings=settings,
        routing=routing,
    )
    # the model stays in eval mode: dropout would make π_θ random, so that the ratio at θ = θ_old
    # is not 1 and the sampler's, π_old's and the update's log-probs would disagree
    if routing is not None:
        routing.begin_updates(generator)
    acc, skipped = optimizer_pass(
        optimizer_params(optimizer),  # under FSDP: the shards, whatever is gathered
        optimizer,
        loss_fn,
        mask=batch.response_mask,
        settings=settings.passes,
        generator=generator,
        dist=dist,
        summed=("loss/policy",) + (() if ref_logprobs is None else ("loss/kl",)),
        grad_norm_key="policy/grad_norm",
        after_step=None if routing is None else routing.optimizer_stepped,
        pad=sharding.train_padding(model),
        tokens=row_tokens(batch),
    )
    if routing is not None:
        acc.add(routing.metrics())
    return mean_metrics(acc, dist), skipped


def micro_batch_loss(
    model,
    batch: RolloutBatch,
    micro: Tensor,
    total_tokens: Tensor,
    total_sequences: Tensor,
    *,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    settings: UpdateSettings,
    routing=None,
) -> C.LossOutput:
    """The clipped policy loss of rows ``micro``: their share of the minibatch's loss.

    π_θ from a forward with gradient; π_old is ``old_logprobs`` (None: the forward itself,
    detached); with a mismatch correction the tokens are weighted by π_old / μ (truncated or
    masked): the three-policy loss :func:`seqrl.core.decoupled_policy_loss`, where μ is the
    sampler's log-probs (with asynchronous rollouts, the worker's older policy) and π_old the
    proximal policy. Adds ``mismatch/*`` and ``policy/entropy`` to the loss's metrics.
    """
    s = settings
    mask = batch.response_mask[micro]  # [b, T]
    logprobs, entropy = response_logprobs(
        model,
        batch,
        micro,
        temperature=s.temperature,
        with_entropy=True,
        routing=routing,
        shared_prefix=s.shared_prefix,
        packing=s.packing,
    )
    old = logprobs.detach() if old_logprobs is None else old_logprobs[micro]  # π_old = π_prox
    sampler_lp = batch.sampler_logprobs[micro]  # μ: the sampler's (or rollout worker's)
    out = C.decoupled_policy_loss(
        s.loss,
        logprobs=logprobs,
        prox_logprobs=old,
        behaviour_logprobs=sampler_lp,
        advantages=advantages[micro],
        mask=mask,
        correction=s.mismatch_correction,
        level=s.mismatch_level,
        cap=s.mismatch_cap,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs[micro],
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        defer_normalizer=True,  # FIPO's drop rule: divided once the whole minibatch is seen
    )
    correct = s.mismatch_correction != "none"
    extra = C.mismatch_metrics(old, sampler_lp, mask, cap=s.mismatch_cap if correct else None)
    extra["policy/entropy"] = C.masked_mean(entropy, mask)
    return dataclasses.replace(out, metrics=out.metrics | extra)
