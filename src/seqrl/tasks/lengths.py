"""Prompt lengths in tokens, checked once when the problems are loaded.

A prompt must leave room for the response in the model's context:

    prompt tokens ≤ limit,   limit = task.max_prompt_tokens, or (by default)
                             the model's context (max_position_embeddings) − the generation budget

A longer prompt is an error naming its file and row (``Example.source``), or, with
``on_error="skip"``, is left out and counted. Without this check one oversized row reaches the
sampler, whose attention over millions of positions takes all the machine's memory.

Counting is cheap: the prompts are tokenized once, in batches, exactly as the sampler tokenizes
them (``add_special_tokens=False``); a prompt of more than :data:`CHARS_PER_TOKEN` × (limit + 1)
characters is first counted on that many leading characters only, so a 10 MB row costs what a
short one does.

>>> from seqrl.models import load_policy
>>> model, tok = load_policy("builtin:nano")
>>> prompt_limit(None, context_length(model), max_new_tokens=16)
(240, "the model's 256-position context minus the 16-token generation budget")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from seqrl.tasks.base import Example
from seqrl.tasks.files import DataError

CHARS_PER_TOKEN = 32
"""Characters per token beyond which a prompt's prefix alone is counted first (natural text has ~4)."""

SLACK = 8
"""Tokens a cut prefix may gain over the whole text (its last word split in two)."""

ROW_FIX = (
    "shorten or drop the row, set task.on_error=skip to leave such rows out, or set "
    "task.max_prompt_tokens (only above the default if the model takes longer inputs)"
)

_BATCH_CHARS = 1 << 20  # characters tokenized per batch: bounds the memory of one call


def context_length(model) -> int | None:
    """The number of positions ``model`` was built for (its HF config), or None if it says none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_limit(
    setting: int | None,
    context: int | None,
    *,
    max_new_tokens: int,
    setting_name: str = "task.max_prompt_tokens",
) -> tuple[int | None, str]:
    """(the most tokens a prompt may have, why): ``setting``, else ``context`` − the budget.

    (None, "") when neither is known (a model whose config names no context length).
    """
    if setting is not None:
        return setting, setting_name
    if context is None:
        return None, ""
    why = (
        f"the model's {context}-position context minus the {max_new_tokens}-token generation budget"
    )
    return context - max_new_tokens, why


def prompt_token_counts(
    tokenizer, prompts: Sequence[str], limit: int
) -> tuple[list[int], list[bool]]:
    """(tokens of each prompt as the sampler encodes it, whether that count is a lower bound).

    Exact up to ``limit``, and above it too unless the prompt is longer than
    ``CHARS_PER_TOKEN · (limit + 1)`` characters: such a prompt is counted on that prefix first,
    and when the prefix alone has more than ``limit + SLACK`` tokens its count is returned as a
    lower bound; otherwise the whole prompt is counted.
    """
    cap = CHARS_PER_TOKEN * (limit + 1)
    counts = _count(tokenizer, [p[:cap] for p in prompts])
    lower = [False] * len(prompts)
    for i, p in enumerate(prompts):
        if len(p) <= cap:
            continue
        if counts[i] > limit + SLACK:
            lower[i] = True
        else:  # rare: a long prompt of very long tokens; count all of it
            counts[i] = _count(tokenizer, [p])[0]
    return counts, lower


def _count(tokenizer, texts: list[str]) -> list[int]:
    """Token counts, in batches of about ``_BATCH_CHARS`` characters."""
    out: list[int] = []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= _BATCH_CHARS):
            size += len(texts[end])
            end += 1
        out += _encode_lengths(tokenizer, texts[start:end])
        start = end
    return out


def _encode_lengths(tokenizer, texts: list[str]) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # the fast tokenizer's own batch encoder: what tokenizer(texts) runs, without its
        # conversion of every id list to Python (4× faster on 20k short prompts)
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(x) for x in ids]


def check_prompt_lengths(
    examples: Sequence[Example],
    tokenizer,
    limit: int,
    *,
    why: str,
    split: str,
    on_error: Literal["raise", "skip"] = "raise",
    fix: str = ROW_FIX,
) -> tuple[list[Example], list[str]]:
    """(the examples whose prompt fits in ``limit`` tokens, a message per example left out).

    With ``on_error="raise"`` the first prompt over the limit raises :class:`DataError` naming
    its file and row (``Example.source``; else its position in ``split``), the limit and ``fix``.
    """
    if limit < 1:
        raise DataError(
            f"no room for a prompt: {why} is {limit} tokens; lower the generation budget "
            "(rollout.max_new_tokens, seqrl eval --max-new-tokens), use a model with a longer "
            "context, or if the model takes longer inputs than its config says, set the limit "
            "(task.max_prompt_tokens, seqrl eval --max-prompt-tokens)"
        )
    counts, lower = prompt_token_counts(tokenizer, [e.prompt for e in examples], limit)
    kept, problems = [], []
    for i, example in enumerate(examples):
        if counts[i] <= limit:
            kept.append(example)
            continue
        where = example.source or f"prompt {i + 1} of the {split} split"
        size = f"{counts[i]} tokens"
        if lower[i]:
            cap = CHARS_PER_TOKEN * (limit + 1)
            size = f"{len(example.prompt)} characters ({counts[i]} tokens in its first {cap})"
        message = f"{where}: the prompt has {size}, more than the {limit} allowed ({why})"
        if on_error == "raise":
            raise DataError(f"{message}; {fix}")
        problems.append(message)
    return kept, problems
