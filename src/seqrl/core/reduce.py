"""Loss aggregation: a per-token matrix [B, T] and its mask → one scalar (spec §0.3).

| mode                       | formula                                   | used by                    |
|----------------------------|-------------------------------------------|----------------------------|
| ``token-mean``             | Σ_{i,t} m ℓ / Σ_{i,t} m                   | DAPO, FIPO, SPPO, PPO       |
| ``seq-mean-token-mean``    | (1/N) Σ_i (Σ_t m ℓ / Σ_t m)               | GRPO Eq. 3, GSPO            |
| ``seq-mean-token-sum``     | (1/N) Σ_i Σ_t m ℓ                         | plain per-sequence sum      |
| ``seq-mean-token-sum-norm``| (1/N) Σ_i Σ_t m ℓ / max_tokens            | Dr. GRPO (constant divisor) |

N is the number of sequences with at least one valid token. Under gradient accumulation (or
several ranks) the normaliser must be the whole optimiser mini-batch's, not the micro-batch's:
pass ``total_tokens`` (for ``token-mean``) or ``total_sequences`` (for the ``seq-mean-*`` modes)
counted over the mini-batch, and summing the micro-batch losses then gives exactly the
mini-batch loss (spec invariant 27).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from seqrl.core.masks import check_mask, masked_sum

AggMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: AggMode,
    *,
    max_tokens: float | None = None,
    total_tokens: Tensor | float | None = None,
    total_sequences: Tensor | float | None = None,
) -> Tensor:
    """Reduce ``values`` [B, T] over ``mask`` [B, T] to a 0-d tensor with the given mode.

    ``max_tokens`` is Dr. GRPO's training-wide constant (the generation budget), required by
    ``seq-mean-token-sum-norm`` and rejected by the other modes. ``total_tokens`` /
    ``total_sequences`` override the local normaliser (see the module docstring).
    """
    check_mask(mask, values)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    if mode == "seq-mean-token-sum-norm":
        if max_tokens is None or max_tokens <= 0:
            raise ValueError(
                "seq-mean-token-sum-norm (Dr. GRPO) needs max_tokens, a positive training-wide "
                "constant such as the generation budget; never the padded batch width"
            )
    elif max_tokens is not None:
        raise ValueError(f"max_tokens only applies to seq-mean-token-sum-norm, not {mode!r}")
    if mode == "token-mean" and total_sequences is not None:
        raise ValueError("token-mean normalises by tokens: pass total_tokens, not total_sequences")
    if mode != "token-mean" and total_tokens is not None:
        raise ValueError(f"{mode} normalises by sequences: pass total_sequences, not total_tokens")

    if mode == "token-mean":
        denom = mask.sum().clamp(min=1) if total_tokens is None else total_tokens
        return masked_sum(values, mask) / denom

    per_seq = masked_sum(values, mask, dim=-1)  # [B]
    lengths = mask.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / lengths.clamp(min=1).to(values.dtype)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / max_tokens
    if total_sequences is None:
        total_sequences = (lengths > 0).sum().clamp(min=1)
    return per_seq.sum() / total_sequences


def normalizers(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(total_tokens, total_sequences) of a mini-batch mask, for passing to micro-batch losses.

    Both are at least 1, as the local normalisers of :func:`aggregate` are: a mini-batch with no
    valid token (e.g. every response truncated under overlong filtering) has loss 0, not 0/0.
    """
    return mask.sum().clamp(min=1), (mask.sum(dim=-1) > 0).sum().clamp(min=1)


__all__ = ["AGG_MODES", "AggMode", "aggregate", "normalizers"]
