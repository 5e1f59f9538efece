"""A stand-in for a real pretrained model: a byte-level BPE tokenizer trained on your text and a
small randomly initialised model of a standard architecture, saved as a Hugging Face directory.

The directory is loaded exactly like a downloaded model (``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained``), chat template included, so every code path a real
model takes can be tried on a CPU in seconds:

>>> from seqrl.models.pretrained import write_stand_in
>>> write_stand_in("tiny-llama", ["Gus has 4 marbles. ...", "#### 13"])  # doctest: +SKIP

or ``seqrl make-model tiny-llama --text examples/data/gsm8k_toy.jsonl``. Its weights are random:
it learns the format of your data with ``seqrl sft``-style training, not arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from seqrl.models.tiny import set_generation_ids

EOS = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The ChatML template many instruction-tuned models (e.g. Qwen) use."""

ARCHITECTURES = {
    # model_type → config fields besides the size (the MLP is 4 × hidden wide)
    "llama": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 2, "sliding_window": None},
}

SIZES = {
    # name → (hidden size, layers, attention heads); besides the embeddings "tiny" has ~0.12M
    # parameters, "small" ~1.0M, "base" ~5.7M
    "tiny": (64, 2, 4),
    "small": (128, 4, 4),
    "base": (256, 6, 8),
}
"""``seqrl make-model --size``: the stand-in's shape; --hidden / --layers / --heads override it."""


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Qwen style) trained on ``texts``, with a ChatML template.

    Every byte is in the vocabulary, so no text is ever out of vocabulary.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=list(CHAT_TOKENS),
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def write_stand_in(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    architecture: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts``, build a random ``architecture`` model, ``save_pretrained``.

    The MLP is ``4 × hidden_size`` wide; ``hidden_size`` must be a multiple of ``heads`` and
    ``heads`` of the 2 key-value heads.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; valid: {', '.join(sorted(ARCHITECTURES))}"
        )
    if min(hidden_size, layers, heads) < 1 or hidden_size % heads or heads % 2:
        raise ValueError(
            f"hidden size {hidden_size}, {layers} layers and {heads} heads do not make a model: "
            "the hidden size must be a multiple of the heads, and the heads an even number "
            "(there are 2 key-value heads)"
        )
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **ARCHITECTURES[architecture],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    set_generation_ids(model, tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
