"""MoE routing statistics: how far the experts chosen for the same tokens moved, and expert load.

Shapes: N tokens (any leading shape flattened), k experts per token, E experts. Expert indices
are int tensors [..., k] as a top-k router returns them, in any order within a token (a top-k
*set* is compared, not a ranking).

GSPO (arXiv 2507.18071, §5.3) reports that after one gradient update about 10% of the experts
activated for a token differ; its exact protocol is not given (spec §1.9). Two readings:

- ``routing_set_changed``: the token's top-k set differs at all (share of (token, layer) pairs);
- ``routing_expert_change``: |E_new \\ E_old| / k, the share of the token's experts that changed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(old: Tensor, new: Tensor) -> None:
    if old.shape != new.shape:
        raise ValueError(f"routing shapes differ: old {tuple(old.shape)}, new {tuple(new.shape)}")


def routing_expert_change(old: Tensor, new: Tensor) -> Tensor:
    """|E_new \\ E_old| / k per token: [...] float32, in {0, 1/k, …, 1}.

    old, new: [..., k] expert indices of the same tokens (each row has k distinct experts).
    """
    _check(old, new)
    kept = (new.unsqueeze(-1) == old.unsqueeze(-2)).any(dim=-1)  # [..., k] new expert ∈ E_old
    return (~kept).float().mean(dim=-1)


def routing_set_changed(old: Tensor, new: Tensor) -> Tensor:
    """Whether the token's top-k expert set differs: [...] bool (E_new ≠ E_old as sets)."""
    return routing_expert_change(old, new) > 0


def expert_load(indices: Tensor, mask: Tensor, num_experts: int) -> Tensor:
    """Share of the routed (token, slot) assignments that go to each expert: [E], sums to 1.

    indices: [..., k]; mask: [...] bool, True = the token counts. All zeros when no token counts.
    """
    picked = indices[mask]  # [n, k]
    counts = torch.bincount(picked.reshape(-1).long(), minlength=num_experts).float()  # [E]
    return counts / counts.sum().clamp(min=1)


def load_cv(load: Tensor) -> Tensor:
    """Coefficient of variation of expert load: std / mean over experts (population std); 0 = even."""
    mean = load.mean(dim=-1)
    std = (load - mean.unsqueeze(-1)).pow(2).mean(dim=-1).sqrt()
    return std / mean.clamp(min=1e-12)
