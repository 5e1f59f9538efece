"""Logits → per-token log-probs and entropy at the sampled tokens.

logits [B, T, V] are the model's outputs already aligned with ``tokens`` [B, T] (position t's
logits predict token t). Log-probs are ``logit[token] − logsumexp(logits)``, which never builds a
second [B, T, V] tensor of log-softmax values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token]: [B, T, V], [B, T] → [B, T] (float32 or wider)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """H = −Σ_v p_v log p_v of softmax(logits / temperature): [B, T, V] → [B, T]."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, T, 1]
    probs = torch.exp(logits - log_z)  # [B, T, V]
    return log_z.squeeze(-1) - (probs * logits).sum(-1)
