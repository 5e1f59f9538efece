"""How a problem becomes the text and tokens the policy sees; one path for RL, SFT and evaluation.

    text   = the chat template over the row's turns, generation prompt added
                 (a ``messages`` row, or any row with ``task.chat_template: true``)
           = ``task.prompt_template`` with the prompt in place of ``{prompt}``   (otherwise)
    prompt = tokenizer(text, add_special_tokens=False)       the tokenizer adds no BOS or EOS;
                                                             a chat template may write its own
    reply  = tokenizer(completion, add_special_tokens=False) + [tokenizer.eos_token_id]

The rollout samples the reply after the prompt and stops at the first EOS
(:func:`seqrl.rollout.base.response_mask_from_tokens`); the answer is decoded with special
tokens skipped. ``seqrl sft`` trains on exactly this layout (:func:`seqrl.train.sft.encode_sft_batch`),
so a warm start made by it is encoded as the rollout will encode its prompts. A warm start
trained elsewhere must match it too: same template, no BOS unless the template writes one, and
the tokenizer's EOS at the end of every reply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from seqrl.models.tokenizer import chat_prompts
from seqrl.tasks.base import Example


def chat_turns(example: Example) -> list[dict]:
    """The turns of ``example``'s prompt: a ``messages`` row's own, else one user turn."""
    turns = example.meta.get("messages")
    return list(turns) if turns else [{"role": "user", "content": example.prompt}]


def needs_chat(examples: Sequence[Example]) -> bool:
    """True when some example is a chat (a ``messages`` row): it can only be rendered as one."""
    return any(e.meta.get("messages") for e in examples)


def rendered(tokenizer, examples: Sequence[Example], *, chat: bool) -> list[Example]:
    """``examples`` with each prompt as the policy sees it (``chat``: in the chat template).

    When any example is a ``messages`` row, every example is rendered with the chat template
    (one data set, one format). The reference answer and metadata are unchanged: verification
    never sees the template.
    """
    if not (chat or needs_chat(examples)):
        return list(examples)
    texts = chat_prompts(tokenizer, [chat_turns(e) for e in examples])
    return [dataclasses.replace(e, prompt=t) for e, t in zip(examples, texts, strict=True)]


def with_template(example: Example, template: str) -> Example:
    """``template`` applied to the prompt (and to the last user turn of a ``messages`` row)."""
    meta = example.meta
    if meta.get("messages"):
        turns = [dict(t) for t in meta["messages"]]
        turns[-1]["content"] = template.format(prompt=turns[-1]["content"])
        meta = {**meta, "messages": turns}
    return dataclasses.replace(example, prompt=template.format(prompt=example.prompt), meta=meta)
