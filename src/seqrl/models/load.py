"""Load and save policies: built-in tiny models or any Hugging Face causal LM.

A spec is ``builtin:<name>``, an existing local directory, or a Hub id (``org/name``) that
transformers loads from its cache or, when online, downloads. Tests use only the first two.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from seqrl.models.tiny import (
    TINY_MOE_CONFIGS,
    build_tiny_model,
    build_tiny_moe_model,
    set_generation_ids,
)
from seqrl.models.tokenizer import build_tokenizer

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
"""Where shipped checkpoints live (``src/seqrl/assets/<name>/``)."""

BUILTIN_PREFIX = "builtin:"

BUILTINS: dict[str, str] = {
    "tiny": "randomly initialised tiny Qwen2 (~1.6M params, seed 0) with the character tokenizer",
    "tiny-addition": "the tiny model after supervised warm start on addition (shipped checkpoint)",
    "tiny-addition-noisy": "tiny-addition fine-tuned on a teacher that forgets the ones carry 70% "
    "of the time: often wrong in one fixable way (the demo's warm start; shipped checkpoint)",
    "tiny-scratchpad-noisy": "the tiny model warm-started on the scratchpad task (2-digit, 3 "
    "operands; 100% held-out), then on a teacher that forgets a line's ones carry 70% of the "
    "time (27.5% held-out): a long-answer warm start for DAPO/FIPO (shipped checkpoint)",
    "tiny-scratchpad-optional": "the tiny model warm-started on the scratchpad task (2-digit, 3 "
    "operands), then on a teacher that mostly answers with the bare '#sum' worked in its head "
    "(forgetting a ones carry 70% of the time) and sometimes writes the scratchpad (right): "
    "length and correctness go together; FIPO's length testbed (shipped checkpoint)",
    "tiny-moe": "randomly initialised tiny Qwen3-MoE (4 blocks of 8 experts, top-2; ~1.4M params, "
    "seed 0) with the character tokenizer",
    "tiny-moe-addition-noisy": "tiny-moe warm-started on addition (98% held-out), then on a "
    "teacher that forgets the ones carry 70% of the time (62% held-out): the MoE demo's warm "
    "start (shipped checkpoint)",
    "nano": "randomly initialised nano Qwen2 (~0.1M params, seed 0), for fast tests",
}
"""Built-in policy name → description (use as ``builtin:<name>``)."""

_SHIPPED = {
    "tiny-addition": "seqrl sft --out src/seqrl/assets/tiny-addition --steps 2000 --lr 1e-3",
    "tiny-addition-noisy": "seqrl sft --model builtin:tiny-addition "
    "--out src/seqrl/assets/tiny-addition-noisy --steps 400 --lr 3e-4 --teacher-slip-rate 0.7",
    "tiny-scratchpad-noisy": "seqrl sft --task scratchpad --digits 2 --operands 3 --steps 2500 "
    "--out scratchpad-clean && seqrl sft --model scratchpad-clean --task scratchpad --digits 2 "
    "--operands 3 --steps 300 --lr 3e-4 --teacher-slip-rate 0.7 "
    "--out src/seqrl/assets/tiny-scratchpad-noisy",
    "tiny-scratchpad-optional": "seqrl sft --task scratchpad --digits 2 --operands 3 --steps 1200 "
    "--out scratchpad-clean-1200 && seqrl sft --model scratchpad-clean-1200 --task scratchpad "
    "--digits 2 "
    "--operands 3 --steps 400 --lr 3e-4 --direct-answer-rate 0.8 --direct-slip-rate 0.7 "
    "--out src/seqrl/assets/tiny-scratchpad-optional",
    "tiny-moe-addition-noisy": "seqrl sft --model builtin:tiny-moe --steps 6000 --lr 1e-3 "
    "--out moe-addition-clean && seqrl sft --model moe-addition-clean --steps 400 --lr 3e-4 "
    "--teacher-slip-rate 0.7 --out src/seqrl/assets/tiny-moe-addition-noisy",
}
"""Built-ins that are checkpoints under :data:`ASSETS_DIR`, with the command that makes each."""

_GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
"""``tokenizer_class`` values meaning "the pipeline is exactly tokenizer.json"."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch.dtype) → torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16")
    return _DTYPES[dtype]


def list_builtins() -> list[str]:
    """The valid ``builtin:<name>`` specs."""
    return [BUILTIN_PREFIX + name for name in BUILTINS]


def _builtins_hint() -> str:
    return "built-in policies: " + ", ".join(list_builtins())


def _builtin_dir(name: str) -> Path:
    """The checkpoint directory of a shipped built-in, or FileNotFoundError saying how to make it."""
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the checkpoint for 'builtin:{name}' is missing (expected {path}/config.json); "
            f"make it with `{_SHIPPED[name]}`"
        )
    return path


def load_policy(
    spec: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``builtin:<name>`` or a local HF causal-LM directory.

    The model is returned in eval mode with ``dtype`` on ``device`` (CPU when None); the tokenizer
    pads on the left and has a pad token (the EOS token when the checkpoint defines none).
    Raises FileNotFoundError for an unknown built-in, a missing shipped checkpoint or a path that
    is not an existing directory (the message lists the built-ins).
    """
    torch_dtype = resolve_dtype(dtype)
    spec_str = str(spec)
    if spec_str.startswith(BUILTIN_PREFIX):
        name = spec_str[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise FileNotFoundError(f"unknown built-in policy {spec_str!r}; {_builtins_hint()}")
        if name in _SHIPPED:
            model, tok = _load_dir(_builtin_dir(name), torch_dtype)
        else:
            tok = build_tokenizer()
            build = build_tiny_moe_model if name in TINY_MOE_CONFIGS else build_tiny_model
            model = build(tok, size=name, seed=0).to(torch_dtype)
    else:
        path = Path(spec_str).expanduser()
        if path.is_dir():
            model, tok = _load_dir(path, torch_dtype)
        elif _HUB_ID.fullmatch(spec_str):
            model, tok = _load_hub(spec_str, torch_dtype)
        else:
            raise FileNotFoundError(
                f"policy {spec_str!r} is not an existing local directory or a Hugging Face Hub "
                f"id (org/name); give a model directory, a hub id or one of the {_builtins_hint()}"
            )
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``org/name``: a Hugging Face Hub model id (tried only when no such local directory exists)."""


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub model through the local cache (downloads only when online and not cached)."""
    try:
        tok = AutoTokenizer.from_pretrained(repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"policy {repo_id!r} is not a local directory, and loading it from the Hugging Face "
            f"Hub failed ({type(err).__name__}: {str(err).splitlines()[0]}). Offline, download "
            f"it elsewhere (`huggingface-cli download {repo_id} --local-dir DIR`) and give DIR."
        ) from None
    return _ready(model, tok)


def _ready(model: PreTrainedModel, tok: PreTrainedTokenizerBase):
    """Left padding and a pad token (EOS when the checkpoint has none), ids in the model config."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    set_generation_ids(model, tok)
    return model, tok


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer + AutoModelForCausalLM from a local directory (the path real models take)."""
    tok = _load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return _ready(model, tok)


def _declared_tokenizer_class(path: Path) -> str | None:
    """The ``tokenizer_class`` in ``path/tokenizer_config.json`` (None when absent/unreadable)."""
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("tokenizer_class") if isinstance(cfg, dict) else None


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except for directories that declare a generic tokenizer.json tokenizer.

    transformers 5 ignores a declared ``TokenizersBackend`` for ``model_type: qwen2`` and builds
    ``Qwen2Tokenizer`` (byte-level BPE) from the vocabulary alone, which would silently turn the
    seqrl character tokenizer into a different one. A directory whose tokenizer_config.json says
    its tokenizer is exactly ``tokenizer.json`` is therefore loaded as such.
    """
    if (
        _declared_tokenizer_class(path) in _GENERIC_TOKENIZER_CLASSES
        and (path / "tokenizer.json").is_file()
    ):
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant).

    It acts only where :func:`checkpointing_active` switches it on (the policy update), never
    while sampling, and leaves dropout modules as they are (off in eval mode).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; "
            "set model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def checkpointing_active(model: torch.nn.Module):
    """Within the block, the checkpointed layers recompute activations in backward.

    transformers checkpoints a layer only while that layer is in training mode; switching
    ``training`` on for those layers alone (not their submodules) keeps dropout off, so the
    maths is that of eval mode, with activations recomputed.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    before = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.training = was


def save_policy(model: Any, tok: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """``save_pretrained`` of model (safetensors, with its generation config) and tokenizer.

    A LoRA model is saved merged (a plain HF model), with the adapter alone in ``adapter/``.
    Creates ``out_dir`` if needed and returns it; :func:`load_policy` reads it back.
    """
    from seqrl.models.lora import is_lora, merged, save_adapter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged(model).save_pretrained(out)  # LoRA adapters folded in: a plain HF model
    tok.save_pretrained(out)
    if is_lora(model):
        save_adapter(model, out / "adapter")
    return out
