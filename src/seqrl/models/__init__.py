"""seqrl.models: the character tokenizer, tiny Qwen2 policies (dense and MoE), policy load/save.

>>> tok = build_tokenizer()
>>> model = build_tiny_model(tok, size="tiny", seed=0)
>>> model, tok = load_policy("builtin:tiny")          # or a local HF dir, or "builtin:tiny-addition"
>>> moe, _ = load_policy("builtin:tiny-moe")          # Qwen3-MoE; routing hooks: seqrl.models.moe
>>> save_policy(model, tok, "/tmp/policy")             # doctest: +SKIP
"""

from seqrl.models.load import (
    ASSETS_DIR,
    BUILTINS,
    list_builtins,
    load_policy,
    resolve_dtype,
    save_policy,
)
from seqrl.models.tiny import (
    TINY_CONFIGS,
    TINY_MOE_CONFIGS,
    build_tiny_model,
    build_tiny_moe_model,
    num_parameters,
    set_generation_ids,
    tiny_config,
)
from seqrl.models.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer, chat_prompts

__all__ = [
    "ALPHABET",
    "ASSETS_DIR",
    "BUILTINS",
    "SPECIAL_TOKENS",
    "TINY_CONFIGS",
    "TINY_MOE_CONFIGS",
    "build_tiny_model",
    "build_tiny_moe_model",
    "build_tokenizer",
    "chat_prompts",
    "list_builtins",
    "load_policy",
    "num_parameters",
    "resolve_dtype",
    "save_policy",
    "set_generation_ids",
    "tiny_config",
]
