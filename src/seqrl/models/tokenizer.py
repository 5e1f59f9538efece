"""A character-level tokenizer built locally with ``tokenizers`` (nothing is downloaded).

Every character of the fixed :data:`ALPHABET` is one token, so ``len(tok(text).input_ids) ==
len(text)`` for any text over the alphabet, and spaces and newlines round-trip exactly through
``encode`` / ``decode``. Characters outside the alphabet map to ``<unk>``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
"""Special tokens; their ids are 0, 1, 2, 3 in this order."""

ALPHABET: str = (
    string.digits
    + "+-*=() \n"
    + string.ascii_lowercase
    + string.ascii_uppercase
    + "#.,:;?!'\"/_%<>[]"
)
"""The ordinary (non-special) tokens, one character each; ids follow the specials."""

MODEL_MAX_LENGTH = 256


def build_vocab() -> dict[str, int]:
    """Token → id: the specials first (pad 0, bos 1, eos 2, unk 3), then :data:`ALPHABET` in order."""
    tokens = list(SPECIAL_TOKENS) + list(ALPHABET)
    assert len(set(tokens)) == len(tokens), "duplicate character in ALPHABET"
    return {t: i for i, t in enumerate(tokens)}


def build_backend() -> Tokenizer:
    """The raw ``tokenizers.Tokenizer``: WordLevel over single characters, fused decoding."""
    tok = Tokenizer(models.WordLevel(vocab=build_vocab(), unk_token=UNK))
    # Oniguruma's (?m) makes '.' match '\n' too, so every character is isolated.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with no separator
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The seqrl character tokenizer as a ``transformers`` fast tokenizer.

    No special tokens are added on encoding (like Qwen2): ``tok("12+34=")`` gives exactly one id
    per character. Padding is on the left (for generation); ``decode(..., skip_special_tokens=True)``
    returns the original text.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        truncation_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def chat_prompts(tokenizer, prompts: list[str] | list[list[dict]]) -> list[str]:
    """Each prompt in the tokenizer's chat template, generation prompt added.

    A prompt is a string (one user turn) or a list of ``{"role", "content"}`` turns ending with
    a user turn. Raises ValueError when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template: set a plain template instead "
            "(task.prompt_template / seqrl eval --template) or use a model that ships one"
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else list(p),
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in prompts
    ]
