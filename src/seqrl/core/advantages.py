"""Advantage estimators and token-level rewards (spec §1.3, §2.3, §4.1–§4.6).

Sequence-level estimators take rewards [B] laid out as P consecutive groups of G samples
(B = P·G, rows i·G … i·G + G − 1 share a prompt) and return [B]; :func:`broadcast_to_tokens`
copies a per-sequence advantage onto the valid tokens of its response.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from seqrl.core.kl import KLEstimator, kl_estimate
from seqrl.core.masks import check_mask, masked_whiten


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of {group_size}: "
            "B must be a multiple of the group size (consecutive rows share a prompt)"
        )
    return rewards.view(-1, group_size)  # [P, G]


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: Literal["std", "none"] = "std",
    eps: float = 1e-6,
) -> Tensor:
    """GRPO/DAPO/GSPO/FIPO outcome advantage (GSPO Eq. 6, DeepSeekMath §4.1.2): [B] → [B].

        "std":  Â_i = (r_i − mean_G r) / (std_G r + eps),   std unbiased (ddof = 1), as verl
        "none": Â_i =  r_i − mean_G r                        (Dr. GRPO, arXiv 2503.20783)

    A group of one sample has Â = 0 for both scales: its mean is its own reward, so r − mean = 0
    (and its unbiased std is undefined, so no scale could change that). Every group's advantages
    sum to 0. verl instead gives a group of one mean 0 and std 1, i.e. Â = r (REINFORCE without
    a baseline), which is not this equation.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    grouped = _groups(rewards, group_size)  # [P, G]
    if group_size == 1:  # r − mean = 0; torch's std of one sample would be NaN
        return torch.zeros_like(rewards)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "std":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)  # [B]


def group_centered_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: Ã_i = r_i − mean_G r (no std, no length normalisation): [B] → [B]."""
    return group_advantages(rewards, group_size, scale="none")


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (arXiv 2402.14740): A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1)·(r_i − mean r): [B] → [B]."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (a leave-one-out baseline)")
    grouped = _groups(rewards, group_size)  # [P, G]
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [P, G]
    return (grouped - others).reshape(-1)


def remax_advantages(rewards: Tensor, greedy_rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """ReMax (arXiv 2310.10505): advantage = reward − reward of the greedy response.

    rewards [B] → [B]: A = r(x, y) − r(x, ȳ).
    rewards [B, T] (token-level rewards, e.g. with a KL penalty) and ``mask`` → [B, T]:
    A_t = Σ_{t'≥t} r_{t'} − r(x, ȳ) on valid tokens, 0 elsewhere (verl's form).
    """
    if rewards.dim() == 1:
        if mask is not None:
            raise ValueError("mask is only used with token-level rewards [B, T]")
        return rewards - greedy_rewards
    if mask is None:
        raise ValueError("token-level rewards [B, T] need the response mask")
    check_mask(mask, rewards)
    token_rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1)  # [B, T]
    adv = returns - greedy_rewards[:, None]
    return torch.where(mask, adv, torch.zeros_like(adv))


def sppo_advantages(
    rewards: Tensor,
    value_logits: Tensor,
    *,
    correct_reward: float = 1.0,
    incorrect_reward: float = 0.0,
) -> Tensor:
    """SPPO Eq. 1 (arXiv 2604.08865): A = R − sigmoid(z), z the prompt critic's logit: [B] → [B].

    The critic's V = sigmoid(z) is P(correct), learnt with BCE against the verifier's 0/1
    outcome. When the policy's reward is shaped (a wrong answer worth ``incorrect_reward``
    r_w, a right one ``correct_reward`` r_c, plus any penalties or extra terms already in R),
    the baseline is the critic's expectation of the outcome part of the reward:

        A = R − (r_w + (r_c − r_w) · sigmoid(z))

    which is R − sigmoid(z) for the paper's R ∈ {0, 1} (the defaults). z must come from the
    critic *before* its update on this batch. No group, no normalisation, no whitening; the
    result is detached (the critic is trained by its own BCE loss).
    """
    if rewards.shape != value_logits.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and value_logits {tuple(value_logits.shape)} differ"
        )
    value = torch.sigmoid(value_logits)  # [B] P(correct)
    if correct_reward != 1.0 or incorrect_reward != 0.0:
        value = incorrect_reward + (correct_reward - incorrect_reward) * value
    return (rewards - value).detach()


def broadcast_to_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """Copy a per-sequence value [B] onto the valid tokens of its row: [B, T], 0 elsewhere."""
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != x.shape[0]:
        raise ValueError(
            f"mask must be bool [B, T] with B = {x.shape[0]}, got {mask.dtype} {tuple(mask.shape)}"
        )
    return torch.where(mask, x[:, None], torch.zeros((), dtype=x.dtype, device=x.device))


def token_level_rewards(
    scores: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k1",
) -> Tensor:
    """Per-token rewards for PPO/RLOO/ReMax with the KL penalty in the reward (spec §0.4, §4.4).

        r_t = −β · k(log π_old − log π_ref)_t on every valid token, + score at the last valid token

    scores [B], mask [B, T] → [B, T]; no gradient (computed from the behaviour policy).
    """
    scores = scores.detach() if scores.is_floating_point() else scores.to(torch.get_default_dtype())
    last = mask.cumsum(dim=-1).eq(mask.sum(dim=-1, keepdim=True)) & mask  # [B, T] last valid token
    rewards = torch.where(
        last, scores[:, None], torch.zeros((), dtype=scores.dtype, device=scores.device)
    )
    if kl_coef:
        if old_logprobs is None or ref_logprobs is None:
            raise ValueError("a KL penalty in the reward needs old_logprobs and ref_logprobs")
        kl = kl_estimate(old_logprobs.detach(), ref_logprobs.detach(), mask, kl_estimator)
        rewards = rewards - kl_coef * kl.to(rewards.dtype)
    return rewards


def reward_kl_penalty(
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kl_estimator: KLEstimator = "k1",
) -> Tensor:
    """The per-token penalty of a KL in the reward (spec §0.4, §4.4–§4.6): [B, T] → [B, T].

        p_t = β · k(log π_old − log π_ref)_t          (k1 = log π_old − log π_ref by default)

    Token-level rewards are r_t − p_t (PPO-GAE, ReMax's verl form); a sequence reward is
    R − Σ_t p_t (RLOO and the other sequence-level estimators, verl's sum of token rewards).
    Computed from the behaviour policy, so no gradient; 0 where ``mask`` is False.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    kl = kl_estimate(old_logprobs.detach(), ref_logprobs.detach(), mask, kl_estimator)  # [B, T]
    return kl_coef * kl


def gae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
) -> tuple[Tensor, Tensor]:
    """GAE (arXiv 1506.02438) over the valid tokens of each row: → (advantages, returns), [B, T].

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   Â_t = Σ_l (γλ)^l δ_{t+l},   G_t = Â_t + V(s_t)

    Invalid positions are skipped (the "next" token is the next valid one; after the last valid
    token V = 0). Returns are computed before whitening; ``whiten`` then normalises Â over all
    valid tokens of the batch (verl's masked_whiten). With γ = λ = 1 and a terminal reward only,
    Â_t = R − V(s_t) before whitening and G_t = R.
    """
    check_mask(mask, values)
    B, T = values.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # [B]
    running = torch.zeros(B, dtype=values.dtype, device=values.device)  # [B]
    advantages = torch.zeros_like(values)  # [B, T]
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        running = torch.where(valid, step, running)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, step, torch.zeros_like(step))
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns
