"""The reference sampler on transformers' ``generate`` (KV cache, temperature, top-p).

Besides the responses and their mask, the sampler returns its own log-probs of the sampled tokens
under the distribution it sampled from (temperature and top-p applied), so a trainer can use them
as π_old (GSPO §5.4) instead of recomputing.

With ``seeds`` (one per prompt) every response draws its tokens from its own random stream,
seeded by (prompt seed, sample index) and independent of which other prompts share the batch:
the same prompt with the same seed gets the same response whether it is generated alone, in a
batch of 8, or on another rank of a multi-process run. The draw is the Gumbel-max trick,
y_t = argmax_v (log μ(v) + g_v) with g_v = −log(−log u_v), u_v ~ U(0, 1) from the row's stream,
which samples exactly from μ (the temperature- and top-p-processed distribution).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqrl.rollout.base import (
    RolloutBatch,
    encode_prompts,
    eval_mode,
    response_mask_from_tokens,
)


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

    def sync_weights(self) -> None:
        """Nothing to do: ``generate`` runs on the policy module itself."""

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
