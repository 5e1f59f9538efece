"""Importance ratios, formed in log space and exponentiated once (spec §0.1, §0.2, §1.2, §1.6).

Shapes: B sequences, T response tokens. ``mask`` [B, T] is bool, True = sampled token that counts.
Every function zeroes log-ratios at masked positions *before* any ``exp``, so padding holding
``-1e4`` or ``-inf`` log-probs can produce neither ``inf`` nor ``nan`` (values or gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqrl.core.masks import check_mask, masked_mean


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def token_log_ratio(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, *, clamp: float | None = None
) -> Tensor:
    """δ_t = log π_θ(y_t) − log π_old(y_t) on valid tokens, 0 elsewhere: [B, T] → [B, T].

    ``clamp`` bounds δ to [−clamp, clamp] as a numerical guard (verl and the FIPO code use 20);
    where it binds the gradient is zero, as in those implementations.
    """
    check_mask(mask, logprobs)
    delta = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B, T]
    return _clamp(delta, clamp)


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO Eq. 7 in log space: log s_i = (1/|y_i|) Σ_t δ_{i,t}: [B, T] → [B].

    s_i = exp(log s_i) is the geometric mean of the token ratios; rows with no valid token get 0.
    """
    delta = token_log_ratio(logprobs, old_logprobs, mask)  # [B, T]
    return masked_mean(delta, mask, dim=-1)  # [B]


def gspo_token_log_ratio(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, *, clamp: float | None = None
) -> Tensor:
    """GSPO-token Eq. 14 in log space: log s_{i,t} = log π_t − sg[log π_t] + sg[log s_i].

    Its value equals log s_i on every valid token (0 on padding); its gradient is ∇ log π_t, so
    the token's gradient is scaled by sg[s_i] (Eqs. 15–17). ``clamp`` bounds the result (verl
    clamps at 10) and, where it binds, zeroes the gradient.
    """
    seq = sequence_log_ratio(logprobs, old_logprobs, mask).detach()  # [B]
    own = torch.where(
        mask, logprobs - logprobs.detach(), torch.zeros_like(logprobs)
    )  # [B, T], value 0
    log_ratio = torch.where(mask, own + seq[:, None], torch.zeros_like(logprobs))  # [B, T]
    return _clamp(log_ratio, clamp)


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip_c: float | None = None,
) -> Tensor:
    """Per-token clipped surrogate loss (to minimise), with clip-higher and optional dual clip.

        ℓ1 = −A·w,  ℓ2 = −A·clip(w, 1 − ε_low, 1 + ε_high),  ℓ_clip = max(ℓ1, ℓ2)
        dual clip (Ye et al. 2020, arXiv 1912.09729), only where A < 0:  ℓ = min(ℓ_clip, −A·c)

    ratio, advantages: [B, T] (broadcastable) → [B, T]. Asymmetric ε as in DAPO (arXiv 2503.14476).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c}); use None to disable it")
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    if dual_clip_c is not None:
        dual = torch.minimum(loss, -advantages * dual_clip_c)  # [B, T]
        loss = torch.where(advantages < 0, dual, loss)
    return loss


def clip_masks(
    ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip_c: float | None = None,
) -> dict[str, Tensor]:
    """Where each bound makes the token's gradient zero (spec §0.2), as bool [B, T] masks.

    ``high``: A > 0 and w > 1 + ε_high; ``low``: A < 0 and w < 1 − ε_low;
    ``dual``: A < 0 and w > c (all False when dual clip is off). Only valid tokens can be True.
    """
    high = mask & (advantages > 0) & (ratio > 1.0 + clip_high)
    low = mask & (advantages < 0) & (ratio < 1.0 - clip_low)
    if dual_clip_c is None:
        dual = torch.zeros_like(mask)
    else:
        dual = mask & (advantages < 0) & (ratio > dual_clip_c)
    return {"high": high, "low": low, "dual": dual}
