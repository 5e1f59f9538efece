"""FIPO's future-KL influence weights (arXiv 2603.19835, §3.2; spec §3).

FIPO is DAPO whose per-token advantage is multiplied by a detached weight

    f_t = clip(exp(FutureKL_t), influence_min, influence_max),     Ã_t = Â_t · f_t       (Eq. 7)

with FutureKL from :func:`seqrl.core.returns.future_kl`. Two rules from the official code:

1. Safety (paper §3.2.2; code): where Â_t < 0 and the token ratio w_t > safety_threshold,
   f_t ← clamp(f_t, 0.8, 1.0), so the penalty of an already far-moved negative token is never
   amplified. The paper says "reset to 1"; the two agree under the [1.0, 1.2] range.
2. Sequence drop (code only, not in the paper): a response with more than one valid token having
   Â < 0 and w > c (the dual-clip constant) leaves the loss, numerator and denominator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqrl.core.masks import check_mask

SAFETY_CLAMP = (0.8, 1.0)  # official code: clamp(f, 0.8, 1.0) on safety-rule tokens

# Hyperparameters for policy_loss("fipo", **FIPO_PRESETS[...]); see docs/algorithms.md.
FIPO_PRESETS: dict[str, dict] = {
    # Paper Table 2 and recipe/fipo/run_fipo_qwen2.5_32b.sh (official code at ee25452).
    "official_32b": {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip_c": 10.0,
        "decay_rate": 32.0,
        "influence_min": 1.0,
        "influence_max": 1.2,
        "safety_threshold": 10.0,
        "drop_dual_clipped_sequences": True,
        "log_ratio_clamp": 20.0,
    },
    # Paper Table 3 (7B pilot): symmetric weight range and a safety threshold of 3.0.
    "7b": {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip_c": 10.0,
        "decay_rate": 32.0,
        "influence_min": 0.8,
        "influence_max": 1.2,
        "safety_threshold": 3.0,
        "drop_dual_clipped_sequences": True,
        "log_ratio_clamp": 20.0,
    },
    # ms-swift defaults (loss_type fipo): --delta unset, so no Future-KL filter and no dual clip,
    # fipo_clip_range 0.2 high-only → [1.0, 1.2], safety 4.0, epsilon 0.2 symmetric, no sequence
    # drop, no log-ratio clamp.
    "ms_swift": {
        "clip_low": 0.2,
        "clip_high": 0.2,
        "dual_clip_c": None,
        "decay_rate": 32.0,
        "influence_min": 1.0,
        "influence_max": 1.2,
        "safety_threshold": 4.0,
        "drop_dual_clipped_sequences": False,
        "log_ratio_clamp": None,
    },
}


def influence_weights(
    future_kl: Tensor,
    advantages: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    *,
    influence_min: float | None = 1.0,
    influence_max: float | None = 1.2,
    safety_threshold: float | None = 10.0,
) -> Tensor:
    """f_t = clip(exp F_t, influence_min, influence_max) with the safety rule; [B, T] → [B, T].

    ``advantages`` [B, T] are Â (only their sign is used), ``log_ratio`` [B, T] is δ = log w.
    A bound of None leaves that side open. f is 1 where ``mask`` is False, and is detached.
    """
    check_mask(mask, future_kl)
    weights = torch.exp(future_kl.detach())  # [B, T]
    if influence_min is not None or influence_max is not None:
        weights = weights.clamp(min=influence_min, max=influence_max)
    if safety_threshold is not None:
        risky = mask & (advantages < 0) & (log_ratio.detach() > math.log(safety_threshold))
        weights = torch.where(risky, weights.clamp(*SAFETY_CLAMP), weights)
    return torch.where(mask, weights, torch.ones_like(weights))


def dual_clip_drop_mask(
    advantages: Tensor, log_ratio: Tensor, mask: Tensor, dual_clip_c: float
) -> Tensor:
    """Rows to keep [B] (True = keep): drop a row with > 1 valid token having A < 0 and w > c."""
    check_mask(mask, log_ratio)
    hits = mask & (advantages < 0) & (log_ratio.detach() > math.log(dual_clip_c))  # [B, T]
    return hits.sum(dim=-1) <= 1
