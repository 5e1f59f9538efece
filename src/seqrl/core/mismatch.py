"""Train–inference mismatch: the sampler's likelihood μ against the trainer's π_old.

A rollout engine (vLLM, or HF ``generate`` under other kernels, batch shapes or top-p) samples
from μ, while the loss's importance ratio is taken against π_old recomputed by the trainer. Two
ratios are kept apart:

    staleness  w_t = π_θ(y_t) / π_old(y_t)     what PPO-style clipping acts on (policy/ratio_*)
    mismatch   ρ_t = π_old(y_t) / μ(y_t)       what this module measures and corrects (mismatch/*)

With asynchronous rollouts μ is also an older policy (the rollout worker's weights, a few
versions behind), and π_old is the proximal policy π_prox of the three-policy loss
(:func:`seqrl.core.decoupled_policy_loss`); ρ then carries the staleness of the samples as well
as the engines' numerical gap.

The correction multiplies each token's policy-loss term by a detached weight (truncated or
masked importance sampling; verl ``rollout_is``, TRL ``vllm_importance_sampling_*``):

    level   token:          ρ_{i,t} = exp(log π_old − log μ)
            sequence:       ρ_i = exp(Σ_t (log π_old − log μ)) = Π_t ρ_{i,t}, broadcast over the row
            sequence_mean:  ρ_i = exp((1/|y_i|) Σ_t (log π_old − log μ)) = (Π_t ρ_{i,t})^(1/|y_i|),
                            the length-normalised (geometric-mean) ratio GSPO clips, broadcast
    mode    truncate:  w = min(ρ, C)                     (TIS)
            mask:      w = ρ · 1[ρ ≤ C]                  (masked IS: over-cap tokens or rows get 0)

Zeroed tokens still count in the loss normaliser. The weights are formed in log space, so a
sequence ratio that overflows float still gives C (truncate) or 0 (mask), never inf or NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from seqrl.core.masks import check_mask, masked_extreme, masked_mean, masked_sum

MismatchLevel = Literal["token", "sequence", "sequence_mean"]
MismatchMode = Literal["truncate", "mask"]
MISMATCH_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_mean")
MISMATCH_MODES: tuple[str, ...] = ("truncate", "mask")


def mismatch_log_ratio(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, level: MismatchLevel = "token"
) -> Tensor:
    """log ρ: token level [B, T] (0 on padding); sequence level Σ_t log ρ_{i,t} [B];
    sequence_mean level (1/|y_i|) Σ_t log ρ_{i,t} [B] (0 for an empty row)."""
    check_mask(mask, old_logprobs)
    if level not in MISMATCH_LEVELS:
        raise ValueError(f"mismatch level must be one of {MISMATCH_LEVELS}, got {level!r}")
    log_rho = torch.where(
        mask, old_logprobs.detach() - sampler_logprobs.detach(), torch.zeros_like(old_logprobs)
    )  # [B, T]
    if level == "token":
        return log_rho
    if level == "sequence":
        return masked_sum(log_rho, mask, dim=-1)  # [B]
    return masked_mean(log_rho, mask, dim=-1)  # [B]


def mismatch_weights(
    old_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    *,
    level: MismatchLevel = "token",
    mode: MismatchMode = "truncate",
    cap: float = 2.0,
) -> Tensor:
    """Detached importance weights w [B, T] for the policy-loss terms (0 on padding).

    truncate: w = min(ρ, C); mask: w = ρ · 1[ρ ≤ C]; ρ per token, per sequence or per
    length-normalised sequence (see the module docstring). old_logprobs, sampler_logprobs,
    mask: [B, T].
    """
    if mode not in MISMATCH_MODES:
        raise ValueError(f"mismatch mode must be one of {MISMATCH_MODES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"the mismatch cap C must be > 0, got {cap}")
    log_rho = mismatch_log_ratio(old_logprobs, sampler_logprobs, mask, level=level)
    if level != "token":
        log_rho = log_rho[:, None].expand_as(mask)  # [B, T]
    log_cap = math.log(cap)
    if mode == "truncate":
        w = torch.exp(log_rho.clamp(max=log_cap))
    else:
        w = torch.where(log_rho <= log_cap, torch.exp(log_rho.clamp(max=log_cap)), 0.0)
    return torch.where(mask, w, torch.zeros_like(w))  # [B, T]


def mismatch_metrics(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float | None = None
) -> dict[str, Tensor]:
    """How far π_old is from μ on the sampled tokens (detached 0-d tensors).

    ``mismatch/ratio_{mean,min,max}``: token ρ_t; ``mismatch/kl``: mean of log μ − log π_old
    (the k1 estimate of KL(μ ‖ π_old), the tokens being drawn from μ); ``mismatch/seq_log_ratio_abs``:
    mean |Σ_t log ρ_t| per sequence; with ``cap``: ``mismatch/token_over_cap_frac`` and
    ``mismatch/seq_over_cap_frac``, the fractions a correction with cap C would touch.
    """
    with torch.no_grad():
        log_rho = mismatch_log_ratio(old_logprobs, sampler_logprobs, mask)  # [B, T]
        rho = torch.exp(log_rho.clamp(-20.0, 20.0))
        rows = mask.any(dim=-1)  # [B]
        seq = masked_sum(log_rho, mask, dim=-1)  # [B]
        out = {
            "mismatch/ratio_mean": masked_mean(rho, mask),
            "mismatch/ratio_min": masked_extreme(rho, mask, torch.amin),
            "mismatch/ratio_max": masked_extreme(rho, mask, torch.amax),
            "mismatch/kl": masked_mean(-log_rho, mask),
            "mismatch/seq_log_ratio_abs": masked_mean(seq.abs(), rows),
        }
        if cap is not None:
            log_cap = math.log(cap)
            out["mismatch/token_over_cap_frac"] = masked_mean(
                (log_rho > log_cap).to(rho.dtype), mask
            )
            out["mismatch/seq_over_cap_frac"] = masked_mean((seq > log_cap).to(rho.dtype), rows)
        return out


__all__ = [
    "MISMATCH_LEVELS",
    "MISMATCH_MODES",
    "MismatchLevel",
    "MismatchMode",
    "mismatch_log_ratio",
    "mismatch_metrics",
    "mismatch_weights",
]
