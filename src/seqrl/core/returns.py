"""Discounted reverse cumulative sums, and FIPO's Future-KL (arXiv 2603.19835, Eqs. 4–6).

    y_t = Σ_{k ≥ t} γ^(k−t) x_k          (equivalently y_t = x_t + γ·y_{t+1}, y_{T+1} = 0)

:func:`discounted_reverse_cumsum` computes it exactly in O(B·T·K) time with a chunked scan: each
chunk of K positions is one [K, K] matmul against the upper-triangular decay matrix, and the
chunks are linked by the same scan on the chunk totals with discount γ^K, applied recursively.
For a fixed chunk size that is linear in T, unlike the paper's App. G listing (column chunks of
an [L, L] decay matrix, O(B·T²)), which the tests keep as a parity reference and the benchmark
baseline (``tests/reference.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrl.core.masks import check_mask


def _decay_matrix(size: int, gamma: float, like: Tensor) -> Tensor:
    """U[k, t] = γ^(k−t) for k ≥ t, else 0: [K, K] (row = source k, column = target t)."""
    idx = torch.arange(size, device=like.device)
    dist = idx[:, None] - idx[None, :]  # [K, K]  k − t
    powers = _powers(gamma, dist.clamp(min=0), like)
    return torch.where(dist >= 0, powers, torch.zeros_like(powers))


def _powers(gamma: float, exponents: Tensor, like: Tensor) -> Tensor:
    """γ^e for integer exponents e ≥ 0, in ``like``'s dtype (γ = 0 allowed: 0^0 = 1)."""
    base = torch.tensor(gamma, dtype=torch.float64, device=like.device)
    return base.pow(exponents.to(torch.float64)).to(like.dtype)


def discounted_reverse_cumsum(x: Tensor, gamma: float, *, chunk_size: int = 128) -> Tensor:
    """y_t = Σ_{k≥t} γ^(k−t) x_k along the last dim: [B, T] → [B, T], exact, linear in T."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    B, T = x.shape
    if T == 0:
        return x.clone()
    K = min(max(chunk_size, 2), T)  # ≥ 2 so that each level of the scan is shorter
    n = -(-T // K)  # chunks
    padded = F.pad(x, (0, n * K - T))  # [B, n·K]  zeros after the end change nothing before it
    blocks = padded.view(B, n, K)  # [B, n, K]
    local = blocks @ _decay_matrix(K, gamma, x)  # [B, n, K]  suffix sums inside each chunk
    if n > 1:
        # carry_c = y at the first position of chunk c+1 = scan of the chunk totals with γ^K
        totals = local[:, :, 0]  # [B, n]  Σ_k γ^k x_{s_c + k}
        after = discounted_reverse_cumsum(totals, gamma**K, chunk_size=chunk_size)  # [B, n]
        carry = F.pad(after[:, 1:], (0, 1))  # [B, n]  0 after the last chunk
        tail = _powers(gamma, torch.arange(K, 0, -1, device=x.device), x)  # [K]  γ^(K−t)
        local = local + carry[:, :, None] * tail  # [B, n, K]  + γ^(K−t) · y_{s_{c+1}}
    return local.reshape(B, n * K)[:, :T]


def decay_from_rate(decay_rate: float) -> float:
    """FIPO's γ = 2^(−1/τ): τ is the half-life in tokens (τ = 32 → γ ≈ 0.978572)."""
    if decay_rate <= 0:
        raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
    return 2.0 ** (-1.0 / decay_rate)


def future_kl_participation(log_ratio: Tensor, mask: Tensor, dual_clip_c: float | None) -> Tensor:
    """FIPO Eq. 5: M_k = mask_k ∧ (exp Δ_k ≤ c), tested in log space; c = None keeps all tokens."""
    check_mask(mask, log_ratio)
    if dual_clip_c is None:
        return mask
    return mask & (log_ratio <= math.log(dual_clip_c))


def _masked_shifts(log_ratio: Tensor, mask: Tensor, dual_clip_c: float | None) -> Tensor:
    """D_k = M_k · Δ_k, selected (not multiplied) so inf/nan at dropped tokens cannot leak."""
    keep = future_kl_participation(log_ratio, mask, dual_clip_c)
    return torch.where(keep, log_ratio, torch.zeros_like(log_ratio))


def future_kl(
    log_ratio: Tensor,
    mask: Tensor,
    *,
    decay_rate: float = 32.0,
    dual_clip_c: float | None = None,
    chunk_size: int = 128,
) -> Tensor:
    """FIPO Eq. 6: F_t = Σ_{k≥t} M_k γ^(k−t) Δ_k with γ = 2^(−1/decay_rate): [B, T] → [B, T].

    Δ = log π_θ − log π_old per token; M_k drops padding and tokens whose ratio exceeds the
    dual-clip constant c (official code: Δ_k > log c). The sum includes the current token, and
    masked positions still count in the distance k − t. F is 0 where ``mask`` is False.
    Exact (float64 agrees with the O(T²) double loop to ~1e-15) and O(B·T) for a fixed chunk.
    """
    shifts = _masked_shifts(log_ratio, mask, dual_clip_c)  # [B, T]  D = M·Δ
    out = discounted_reverse_cumsum(shifts, decay_from_rate(decay_rate), chunk_size=chunk_size)
    return torch.where(mask, out, torch.zeros_like(out))
