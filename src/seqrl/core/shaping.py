"""DAPO's reward shaping and sample filters (arXiv 2503.14476, §3.2 and §3.4; spec §4.2).

- Soft overlong punishment (Eq. 13): a length penalty added to the correctness reward.
- Overlong filtering: truncated responses are masked out of the loss.
- Dynamic sampling (Eq. 11): keep only groups whose answers are neither all right nor all wrong.
"""

from __future__ import annotations

import torch
from torch import Tensor


def soft_overlong_penalty(
    lengths: Tensor, max_response_len: int, buffer_len: int, *, factor: float = 1.0
) -> Tensor:
    """R_length(|y|), DAPO Eq. 13: [B] response lengths → [B] penalties (≤ 0).

        0                                   if |y| ≤ L_max − L_cache
        ((L_max − L_cache) − |y|) / L_cache if L_max − L_cache < |y| ≤ L_max
        −1                                  if |y| > L_max
    times ``factor`` (verl's ``overlong_buffer.penalty_factor``, 1.0 in the paper).
    """
    if not 0 < buffer_len <= max_response_len:
        raise ValueError(
            f"need 0 < buffer_len ≤ max_response_len, got {buffer_len}, {max_response_len}"
        )
    start = max_response_len - buffer_len
    penalty = (start - lengths.to(torch.float64)) / buffer_len  # [B]
    penalty = penalty.clamp(min=-1.0, max=0.0)
    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    return (factor * penalty).to(dtype)


def overlong_filter_mask(mask: Tensor, truncated: Tensor) -> Tensor:
    """Overlong filtering: the response mask with truncated rows switched off: [B, T], [B] → [B, T]."""
    if truncated.dtype != torch.bool or truncated.shape != mask.shape[:1]:
        raise ValueError("truncated must be a bool tensor [B] (True = hit the length limit)")
    return mask & ~truncated[:, None]


def mixed_group_mask(correct: Tensor, group_size: int) -> Tensor:
    """Dynamic sampling: which groups to keep, [B] correctness → [P] bool (True = keep).

    A group is kept when 0 < #correct < G (its accuracy has non-zero spread); a group of size 1
    is always kept, as in the verl recipe.
    """
    if correct.dim() != 1 or group_size < 1 or correct.numel() % group_size:
        raise ValueError(f"correct must be [B] with B a multiple of group_size={group_size}")
    if group_size == 1:
        return torch.ones(correct.numel(), dtype=torch.bool, device=correct.device)
    hits = correct.to(torch.float64).view(-1, group_size)  # [P, G]
    return hits.amin(dim=1) < hits.amax(dim=1)
