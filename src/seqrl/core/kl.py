"""KL estimators between the policy and a reference, per token (spec §0.4; Schulman, "Approximating KL").

With ρ_t = log π_θ(y_t) − log π_ref(y_t):
    k1 = ρ                      unbiased, can be negative            (verl "kl")
    k2 = ½ ρ²                                                          (verl "mse")
    k3 = exp(−ρ) + ρ − 1        unbiased, always ≥ 0                   (verl "low_var_kl", GRPO Eq. 4)
Placement: in the loss, ``loss += β · agg(k3)`` (GRPO); in the reward, ``r_t −= β · k1`` computed
from the old policy (PPO/RLOO/ReMax, :func:`seqrl.core.advantages.token_level_rewards`).
Unlike verl we do not clamp k3 to [−10, 10]: the estimate is exact; ρ is zeroed on padding first.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from seqrl.core.masks import check_mask

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLEstimator = "k3"
) -> Tensor:
    """Per-token KL estimate [B, T] of π_θ‖π_ref at the sampled tokens; 0 where mask is False."""
    check_mask(mask, logprobs)
    rho = torch.where(mask, logprobs - ref_logprobs, torch.zeros_like(logprobs))  # [B, T]
    if estimator == "k1":
        return rho
    if estimator == "k2":
        return 0.5 * rho.square()
    if estimator == "k3":
        return torch.expm1(-rho) + rho  # exp(−ρ) − 1 + ρ, accurate near ρ = 0
    raise ValueError(
        f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}"
    )
