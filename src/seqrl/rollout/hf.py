"""The reference sampler on transformers' ``generate`` (KV cache, temperature, top-p).

The sampler is where the response mask is made: True on every sampled token up to and including
the first EOS, False on the padding after it. It also returns its own log-probs of the sampled
tokens under the distribution it sampled from (temperature and top-p applied), so a trainer can
use them as π_old (GSPO §5.4) instead of recomputing.

With ``seeds`` (one per prompt) every response draws its tokens from its own random stream,
seeded by (prompt seed, sample index) and independent of which other prompts share the batch:
the same prompt with the same seed gets the same response whether it is generated alone, in a
batch of 8, or on another rank of a multi-process run. The draw is the Gumbel-max trick,
y_t = argmax_v (log μ(v) + g_v) with g_v = −log(−log u_v), u_v ~ U(0, 1) from the row's stream,
which samples exactly from μ (the temperature- and top-p-processed distribution).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class RolloutBatch:
    """B = P·G sampled responses; rows i·G … i·G + G − 1 share prompt i."""

    prompt_ids: Tensor  # [B, Lp] left-padded
    prompt_mask: Tensor  # [B, Lp] bool, True = real prompt token
    response_ids: Tensor  # [B, T] right-padded with pad_token_id
    response_mask: Tensor  # [B, T] bool, True = sampled token (EOS included)
    sampler_logprobs: (
        Tensor  # [B, T] (float32 or wider), log μ(y_t), 0 where response_mask is False
    )
    truncated: Tensor  # [B] bool, True = no EOS within the token budget
    group_size: int

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(dim=-1)  # [B]


class Sampler(Protocol):
    def generate(
        self,
        prompts: list[str],
        *,
        group_size: int,
        greedy: bool = False,
        seeds: list[int] | None = None,
    ) -> RolloutBatch: ...


def row_seeds(seeds: list[int], group_size: int) -> list[int]:
    """The stream seed of each of the B = P·G rows: sample j of prompt i → (seeds[i], j)."""
    return [(s * 1_000_003 + j) % (2**63 - 1) for s in seeds for j in range(group_size)]


def gumbel_noise(generators: list[torch.Generator], vocab: int, device) -> Tensor:
    """Gumbel(0, 1) noise [B, V], row i drawn from ``generators[i]``.

    argmax(log μ + noise) is an exact sample from μ (the Gumbel-max trick), so each row's sample
    depends on its own stream only, never on its batch-mates.
    """
    u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in generators])
    return -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))


class _RowStreamSampler:
    """A logits processor that samples each row from its own generator (Gumbel-max).

    Called by greedy ``generate`` with the raw next-token logits [B, V]; applies temperature
    and top-p, records log μ [B, V] for the sampler log-probs, and returns log μ + Gumbel noise,
    whose argmax is a sample from μ.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device) -> None:
        from transformers.generation.logits_process import TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.logprobs: list[Tensor] = []  # per step, [B, V]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.float() / self.temperature  # [B, V]
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        logp = torch.log_softmax(scores, dim=-1)  # [B, V] log μ
        self.logprobs.append(logp)
        return logp + gumbel_noise(self.generators, scores.shape[-1], scores.device)


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


class HFSampler:
    """Sampler on ``model.generate``; ``temperature`` and ``top_p`` as in the rollout config."""

    def __init__(
        self, model, tokenizer, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0
    ) -> None:
        if tokenizer.padding_side != "left":
            raise ValueError(
                "generation needs a left-padding tokenizer (tokenizer.padding_side='left')"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return encode_prompts(self.tokenizer, prompts, self.model.device)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        *,
        group_size: int,
        greedy: bool = False,
        temperature: float | None = None,
        seeds: list[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``group_size`` responses per prompt (or one greedy response each).

        ``seeds`` (one per prompt): per-row random streams (see the module docstring);
        None draws from torch's global generator, as ``generate`` does.
        """
        repeated = [p for p in prompts for _ in range(group_size)]
        prompt_ids, prompt_mask = self.encode(repeated)  # [B, Lp]
        temperature = self.temperature if temperature is None else temperature
        if seeds is not None and not greedy:
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            return self._generate_seeded(
                prompt_ids, prompt_mask, row_seeds(seeds, group_size), temperature, group_size
            )
        out, response_ids, mask, truncated = self._run_generate(
            prompt_ids,
            prompt_mask,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else self.top_p,
            output_scores=True,
        )
        scores = torch.stack(out.scores, dim=1)  # [B, T, V] processed logits
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        logprobs = (
            torch.log_softmax(scores, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        )
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))  # [B, T]
        return RolloutBatch(
            prompt_ids, prompt_mask, response_ids, mask, logprobs, truncated, group_size
        )

    def _run_generate(self, prompt_ids: Tensor, prompt_mask: Tensor, **sampling):
        """``model.generate`` in eval mode: (output, response ids [B, T], mask [B, T], truncated [B]).

        ``sampling``: do_sample / temperature / top_p / output_scores / logits_processor.
        """
        with eval_mode(self.model):
            out = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask.long(),
                max_new_tokens=self.max_new_tokens,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                return_dict_in_generate=True,
                **sampling,
            )
        response_ids = out.sequences[:, prompt_ids.shape[1] :]  # [B, T]
        mask, truncated = response_mask_from_tokens(response_ids, self.tokenizer.eos_token_id)
        return out, response_ids, mask, truncated

    def _generate_seeded(
        self, prompt_ids, prompt_mask, seeds: list[int], temperature: float, group_size: int
    ) -> RolloutBatch:
        from transformers import LogitsProcessorList

        row_sampler = _RowStreamSampler(seeds, temperature, self.top_p, prompt_ids.device)
        _, response_ids, mask, truncated = self._run_generate(
            prompt_ids,
            prompt_mask,
            do_sample=False,  # the argmax of log μ + Gumbel noise is the sample
            temperature=None,
            top_p=None,
            logits_processor=LogitsProcessorList([row_sampler]),
        )
        T = response_ids.shape[1]
        logp = torch.stack(row_sampler.logprobs[:T], dim=1)  # [B, T, V]
        logprobs = logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
        return RolloutBatch(
            prompt_ids, prompt_mask, response_ids, mask, logprobs, truncated, group_size
        )
