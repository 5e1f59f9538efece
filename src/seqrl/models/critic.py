"""Critic models: a language-model backbone with a one-output linear head.

Both seqrl critics are the same Hugging Face class, ``AutoModelForTokenClassification`` with
``num_labels=1`` (for Qwen2: ``Qwen2ForTokenClassification`` = ``Qwen2Model`` + ``score``
Linear(hidden, 1)); they differ only in where the output is read (``seqrl.train.critic``):

- the scalar prompt critic (SPPO) runs on the prompt alone and reads the logit z at the last
  prompt token, V(s_p) = sigmoid(z);
- the token critic (PPO-GAE) runs on prompt + response and reads V(s_t) at the position just
  before response token t.

A critic is built from one of these specs (``critic.model`` in the run config):

    "policy"          the policy's architecture, backbone initialised from the policy's weights,
                      fresh head (the SPPO paper's critics start from the policy checkpoint)
    "builtin:SIZE"    a randomly initialised tiny Qwen2 of that size (nano, tiny, small), e.g. a
                      decoupled critic smaller than the policy
    a local directory a saved critic (``final/critic/``) or any HF causal-LM / backbone checkpoint,
                      whose backbone is loaded and given a fresh head

The critic must read the policy's token ids, so its vocabulary must cover the tokenizer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from seqrl.models.tiny import TINY_CONFIGS, tiny_config

POLICY_SPEC = "policy"
BUILTIN_PREFIX = "builtin:"


def _head_config(config: Any) -> Any:
    """A copy of ``config`` for a one-output token-classification head without dropout."""
    config = config.__class__.from_dict(config.to_dict())
    config.num_labels = 1
    config.classifier_dropout = 0.0
    config.id2label, config.label2id = {0: "value"}, {"value": 0}
    return config


def _fresh(config: Any, seed: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForTokenClassification.from_config(config).to(torch.float32)


def build_critic(
    spec: str,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
) -> PreTrainedModel:
    """A critic model (float32, CPU, eval mode) from ``spec`` (see the module docstring).

    The head is drawn inside ``fork_rng`` with ``seed``, so building a critic leaves the
    caller's RNG untouched and is identical for identical (spec, policy, seed).
    """
    spec = str(spec)
    if spec == POLICY_SPEC:
        critic = _fresh(_head_config(policy.config), seed)
        backbone = getattr(policy, policy.base_model_prefix)
        critic.model.load_state_dict(backbone.state_dict(), strict=True)
    elif spec.startswith(BUILTIN_PREFIX):
        size = spec[len(BUILTIN_PREFIX) :]
        if size not in TINY_CONFIGS:
            raise FileNotFoundError(
                f"unknown built-in critic {spec!r}; valid: "
                + ", ".join(f"builtin:{s}" for s in TINY_CONFIGS)
                + f", {POLICY_SPEC!r} or a local directory"
            )
        critic = _fresh(_head_config(tiny_config(tokenizer, size)), seed)
    else:
        critic = _load_dir(Path(spec).expanduser(), seed)
    vocab = critic.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise ValueError(
            f"critic {spec!r} has a vocabulary of {vocab} tokens but the policy's tokenizer has "
            f"{len(tokenizer)}: the critic must read the policy's token ids (use critic.model="
            f"'{POLICY_SPEC}' or a builtin size)"
        )
    return critic.eval()


def _load_dir(path: Path, seed: int) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"critic {str(path)!r} is not a local model directory (no config.json); use "
            f"critic.model='{POLICY_SPEC}', a builtin size (builtin:nano) or a saved critic dir"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "num_labels", None) == 1 and any(
        a.endswith("ForTokenClassification") for a in (config.architectures or [])
    ):  # a saved seqrl critic: load it whole, head included
        return AutoModelForTokenClassification.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        )
    # any other checkpoint (e.g. a causal LM): its backbone, plus a fresh head drawn with seed
    critic = _fresh(_head_config(config), seed)
    loaded = AutoModelForTokenClassification.from_pretrained(
        path, config=_head_config(config), dtype=torch.float32, local_files_only=True
    )
    critic.model.load_state_dict(loaded.model.state_dict(), strict=True)
    return critic


def save_critic(critic: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir) -> Path:
    """``save_pretrained`` of the critic and the tokenizer it reads; ``build_critic(dir)`` reloads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    critic.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
