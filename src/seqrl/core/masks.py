"""Masked reductions. One polarity everywhere: ``mask`` is bool and True means "counts".

Values at masked-out positions never reach a sum: they are selected away with ``torch.where``
(not multiplied by 0), so ``inf``/``nan`` padding cannot leak into a result or its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> None:
    """Raise a clear error unless ``mask`` is a bool tensor of ``like``'s shape."""
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = token counts), got {mask.dtype}; "
            f"convert with {name}.bool() at the source that builds it"
        )
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x over positions where mask is True (all of them when dim is None)."""
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    picked = torch.where(mask, x, zeros)
    return picked.sum() if dim is None else picked.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of True entries (as a float-free int64 tensor)."""
    return mask.sum() if dim is None else mask.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ_mask x / max(#mask, 1): 0 where nothing is valid."""
    count = masked_count(mask, dim).clamp(min=1).to(x.dtype)
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of x (over all dims), ddof = 1 when ``unbiased``."""
    mean = masked_mean(x, mask)
    n = masked_count(mask).to(x.dtype)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1.0).clamp(min=1.0) if unbiased else n.clamp(min=1.0)
    return sq / denom


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var_unbiased + eps) over valid entries; 0 on invalid ones (verl-style)."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def sequence_lengths(mask: Tensor) -> Tensor:
    """Valid tokens per row: mask [B, T] → [B] (int64)."""
    return mask.sum(dim=-1)


def masked_extreme(x: Tensor, mask: Tensor, reduce) -> Tensor:
    """``reduce`` (torch.amin or torch.amax) of the valid entries of x: 0-d; 1.0 (the neutral
    ratio) when there are none."""
    fill = torch.tensor(float("inf") if reduce is torch.amin else float("-inf"), dtype=x.dtype)
    value = reduce(torch.where(mask, x, fill.to(x.device)))
    return torch.where(mask.any(), value, torch.ones_like(value))
