"""What every sampler returns and promises: :class:`RolloutBatch` and the :class:`Sampler` protocol.

A batch is laid out as generation made it: B = P·G rows, rows i·G … i·G + G − 1 answering
prompt i, prompts left-padded and responses right-padded. The response mask is made here too
(:func:`response_mask_from_tokens`): True on every sampled token up to and including the first
EOS, False on the padding after it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class RolloutBatch:
    """B = P·G sampled responses; rows i·G … i·G + G − 1 share prompt i."""

    prompt_ids: Tensor  # [B, Lp] left-padded
    prompt_mask: Tensor  # [B, Lp] bool, True = real prompt token
    response_ids: Tensor  # [B, T] right-padded with pad_token_id
    response_mask: Tensor  # [B, T] bool, True = sampled token (EOS included)
    sampler_logprobs: Tensor  # [B, T] float32 or wider: log μ(y_t), 0 where the mask is False
    truncated: Tensor  # [B] bool, True = no EOS within the token budget
    group_size: int  # G: the one place a step reads it from once the rollout exists

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(dim=-1)  # [B]

    @property
    def num_groups(self) -> int:
        return self.response_ids.shape[0] // self.group_size


@runtime_checkable
class Sampler(Protocol):
    """What the trainer, evaluation and critics call on a rollout engine (hf, fast, vllm)."""

    def generate(
        self,
        prompts: list[str],
        *,
        group_size: int,
        greedy: bool = False,
        temperature: float | None = None,
        seeds: list[int] | None = None,
    ) -> RolloutBatch:
        """``group_size`` responses per prompt (or one greedy each); ``seeds``: one per prompt,
        each response drawn from its own stream (None: the global generator)."""
        ...

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids [B, Lp] and mask [B, Lp] exactly as ``generate`` encodes them."""
        ...

    def sync_weights(self) -> None:
        """Make the next ``generate`` sample from the policy's current weights (after a step)."""
        ...


@contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) within the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids [B, Lp] and attention mask [B, Lp] (bool) on ``device``."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()


def response_mask_from_tokens(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """(mask [B, T], truncated [B]): True up to and including the first EOS of each row."""
    is_eos = response_ids == eos_token_id  # [B, T]
    eos_before = is_eos.cumsum(dim=-1) - is_eos.long()  # [B, T] EOS count strictly before t
    mask = eos_before == 0
    truncated = ~is_eos.any(dim=-1)
    return mask, truncated
