"""Tiny Qwen2 causal LMs, dense and mixture-of-experts, built from a config (random init).

The architectures are the real ``transformers`` Qwen2 (RoPE, GQA, SwiGLU, RMSNorm) and Qwen3-MoE
(the same, with a top-k routed SwiGLU expert layer in every block), so everything that runs on a
tiny model runs unchanged on a real checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # ~0.1M parameters: for fast tests of code that only needs *a* model.
    "nano": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
    ),
    # ~1.6M parameters: the built-in policy ("builtin:tiny", "builtin:tiny-addition").
    "tiny": dict(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
    ),
    # ~4.7M parameters: a little more capacity for the scratchpad task.
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
    ),
}
"""Size name → Qwen2Config keyword arguments (shared settings are in :func:`tiny_config`)."""


TINY_MOE_CONFIGS: dict[str, dict[str, Any]] = {
    # ~1.4M parameters, ~0.5M active per token: 4 blocks of 8 experts, top-2 (builtin:tiny-moe).
    "tiny-moe": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=96,
        intermediate_size=96,  # unused: every block is an expert layer
        norm_topk_prob=True,  # as Qwen3-30B-A3B: the top-k router probabilities sum to 1
    ),
}
"""MoE size name → Qwen3MoeConfig keyword arguments (every block is a routed expert layer)."""


def _shared_kwargs(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Config settings every tiny model shares: vocabulary and special ids from ``tok``, fp32."""
    return dict(
        vocab_size=len(tok),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_cache=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float32",
    )


def tiny_config(tok: PreTrainedTokenizerBase, size: str = "tiny", **overrides: Any) -> Qwen2Config:
    """The Qwen2Config for ``size`` with vocabulary and special ids taken from ``tok``."""
    if size not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model size {size!r}; valid: {', '.join(TINY_CONFIGS)}")
    kwargs = _shared_kwargs(tok)
    kwargs.update(TINY_CONFIGS[size])
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def build_tiny_model(
    tok: PreTrainedTokenizerBase, size: str = "tiny", seed: int = 0, **overrides: Any
) -> Qwen2ForCausalLM:
    """A randomly initialised float32 Qwen2ForCausalLM, identical for identical (size, seed).

    The weights are drawn inside ``torch.random.fork_rng`` so building a model leaves the
    caller's global RNG untouched. ``overrides`` go to :func:`tiny_config`. Returned in eval mode
    (Qwen2 has no dropout, so train/eval only differ for code that checks ``model.training``).
    """
    config = tiny_config(tok, size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.float32)
    set_generation_ids(model, tok)
    return model.eval()


def build_tiny_moe_model(
    tok: PreTrainedTokenizerBase, size: str = "tiny-moe", seed: int = 0, **overrides: Any
) -> Qwen3MoeForCausalLM:
    """A randomly initialised float32 Qwen3MoeForCausalLM, identical for identical (size, seed).

    As :func:`build_tiny_model`; ``overrides`` go to ``Qwen3MoeConfig`` (e.g. ``num_experts``,
    ``num_experts_per_tok``, ``norm_topk_prob``).
    """
    if size not in TINY_MOE_CONFIGS:
        raise ValueError(f"unknown tiny MoE size {size!r}; valid: {', '.join(TINY_MOE_CONFIGS)}")
    config = Qwen3MoeConfig(**(_shared_kwargs(tok) | TINY_MOE_CONFIGS[size] | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
    model = model.to(torch.float32)
    set_generation_ids(model, tok)
    return model.eval()


def set_generation_ids(model: Any, tok: PreTrainedTokenizerBase) -> None:
    """Fill pad/bos/eos ids missing from ``model.config`` / ``model.generation_config`` from ``tok``.

    Ids the model already has are kept (a real checkpoint's choices win).
    """
    for cfg in (model.config, model.generation_config):
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tok.pad_token_id
        if getattr(cfg, "bos_token_id", None) is None and tok.bos_token_id is not None:
            cfg.bos_token_id = tok.bos_token_id
        if getattr(cfg, "eos_token_id", None) is None:
            cfg.eos_token_id = tok.eos_token_id


def num_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
