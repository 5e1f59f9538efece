"""A lean sampler: shared-prompt prefill and a plain decode loop, same distribution as ``generate``.

What it does differently from :class:`seqrl.rollout.hf.HFSampler` (``model.generate``):

1. **One prefill per prompt, not per sample.** The G samples of a prompt share their prompt, so
   the prompt is run once (P rows instead of P·G) and its KV cache is repeated G times. At 8
   samples per prompt this removes 7/8 of the prefill compute.
2. **A decode loop with nothing else in it**: one model call per token, the attention mask a
   slice of one preallocated [B, Lp + T] tensor, position ids computed once, the sampling
   log-probs gathered as the loop goes (no [B, T, V] stack of scores), and an exit as soon as
   every row has emitted EOS. Everything runs under ``torch.inference_mode``.
3. **Finished rows leave the decode batch.** Once at least ``compact_at`` (default 10%) of the
   rows still being decoded have emitted EOS, they are dropped from the batch and its KV cache
   (``batch_select_indices``), so the decode steps cost what the unfinished rows need, not
   what the longest response needs times B. A compaction copies the cache once, about what
   every decode step's cache append already costs. The remaining rows' computation does not depend
   on their batch-mates, and the random draws are made as before (see below), so the samples
   are the same.

Sampling is the same as ``generate``'s: the logits are taken in float32, divided by the
temperature, top-p filtered exactly as transformers' ``TopPLogitsWarper`` does, and one
``torch.multinomial`` draw is made for every row at every step (finished rows included, then
replaced by padding), so the random stream is consumed in the same order; once finished rows
have left the batch, the draw is still made over all B rows (the dropped rows' distributions
are uniform placeholders), because the draw's use of the stream depends on its shape. With
per-prompt streams (``seeds``) each row draws from its own generator, so a dropped row simply
stops drawing. Greedy decoding is the argmax of the raw logits. The only difference is floating-point rounding: the prefill runs on P
rows rather than P·G, which may change logits in the last bits; sampled tokens then agree except
where a draw falls within that rounding of a category boundary (tests check token equality with
``generate`` on the built-in models).

Models whose generation config asks for more than temperature / top-p (repetition penalty,
minimum length, bad words, beams …), encoder-decoder models, and models whose KV cache is not a
transformers ``Cache`` are handed to ``HFSampler`` unchanged, so the sampler accepts every model
the reference sampler accepts (``fallback_reason`` says why).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqrl.models.cache import cache_keyword, returned_cache
from seqrl.rollout.base import RolloutBatch, eval_mode, response_mask_from_tokens
from seqrl.rollout.hf import HFSampler, gumbel_noise, row_seeds

# generation-config fields that add a logits processor or change the search: any of these set to
# a non-neutral value sends generation to model.generate (HFSampler).
_NEUTRAL_GENERATION = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "min_p": (None, 0.0),
    "renormalize_logits": (None, False),
    "num_beams": (None, 1),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
}


def unsupported_reason(model) -> str | None:
    """Why the lean loop cannot reproduce ``generate`` for ``model`` (None when it can)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    gen = getattr(model, "generation_config", None)
    for key, neutral in _NEUTRAL_GENERATION.items():
        value = getattr(gen, key, None)
        if value not in neutral:
            return f"generation_config.{key}={value!r}"
    return None


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """transformers' ``TopPLogitsWarper``: mask (−inf) the smallest tokens holding ≤ 1 − top_p.

    scores [B, V] → [B, V]; the most probable token is always kept.
    """
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)  # [B, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, -float("inf"))


class FastSampler(HFSampler):
    """Drop-in :class:`HFSampler` with a shared-prompt prefill and a lean decode loop.

    ``compact_at``: drop finished rows from the decode batch once at least this share of it has
    finished (None: never; the samples are the same either way).
    """

    def __init__(self, model, tokenizer, *, compact_at: float | None = 0.1, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        if compact_at is not None and not 0 < compact_at <= 1:
            raise ValueError(f"compact_at must lie in (0, 1] or be None, got {compact_at}")
        self.compact_at = compact_at
        self.fallback_reason = unsupported_reason(model)

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

        ``seeds`` (one per prompt): each response draws from its own stream by the Gumbel-max
        trick, the same draws as :class:`HFSampler` makes with these seeds.
        """
        kwargs = dict(group_size=group_size, greedy=greedy, temperature=temperature, seeds=seeds)
        if self.fallback_reason is not None:
            return super().generate(prompts, **kwargs)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        temperature = self.temperature if temperature is None else temperature
        generators = None
        if seeds is not None and not greedy:
            device = self.model.device
            generators = [
                torch.Generator(device=device).manual_seed(s) for s in row_seeds(seeds, group_size)
            ]
        with eval_mode(self.model):
            batch = self._generate(prompts, group_size, greedy, temperature, generators)
        if batch is None:
            return super().generate(prompts, **kwargs)
        return batch

    def _generate(
        self,
        prompts: list[str],
        G: int,
        greedy: bool,
        temperature: float,
        generators: list[torch.Generator] | None = None,
    ) -> RolloutBatch | None:
        model, T_max = self.model, self.max_new_tokens
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        unique_ids, unique_mask = self.encode(prompts)  # [P, Lp]
        prompt_ids = unique_ids.repeat_interleave(G, dim=0)  # [B, Lp], B = P·G
        prompt_mask = unique_mask.repeat_interleave(G, dim=0)
        B, Lp = prompt_ids.shape
        device = prompt_ids.device

        positions = (unique_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [P, Lp]
        out = model(
            input_ids=unique_ids,
            attention_mask=unique_mask.long(),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = returned_cache(out)
        if not hasattr(cache, "batch_repeat_interleave"):  # no transformers Cache: use generate
            self.fallback_reason = f"the model returned a {type(cache).__name__} KV cache"
            return None
        if G > 1:
            cache.batch_repeat_interleave(G)
        logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # [B, V]
        del out

        attention = torch.ones(B, Lp + T_max, dtype=torch.long, device=device)  # [B, Lp + T]
        attention[:, :Lp] = prompt_mask
        next_position = prompt_mask.sum(dim=1, keepdim=True)  # [B, 1] position of response token 0
        # the decode batch: rows[i] is the batch row of decode row i (all B until rows finish)
        rows = torch.arange(B, device=device)  # [b]
        unfinished = torch.ones(B, dtype=torch.bool, device=device)  # [b]
        compact = self.compact_at is not None and hasattr(cache, "batch_select_indices")
        cache_arg = cache_keyword(model)  # the forward's name for the KV cache
        response_ids = torch.full((B, T_max), pad, dtype=torch.long, device=device)  # [B, T_max]
        logprobs = None  # [B, T_max], allocated with the first step's dtype
        T = 0
        for t in range(T_max):
            scores = logits  # [b, V]
            if not greedy:
                if temperature != 1.0:
                    scores = scores / temperature
                if self.top_p < 1.0:
                    scores = top_p_filter(scores, self.top_p)
                if generators is None:  # torch's global stream, in generate's order
                    probs = torch.softmax(scores, dim=-1)  # [b, V]
                    token = _multinomial_over_all_rows(probs, rows, B)  # [b]
                else:  # one stream per response (Gumbel-max), as HFSampler with seeds
                    logp = torch.log_softmax(scores, dim=-1)  # [b, V]
                    token = (logp + gumbel_noise(generators, logp.shape[-1], logp.device)).argmax(
                        -1
                    )
            else:
                token = scores.argmax(dim=-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            # log-softmax then gather, as HFSampler does from generate's scores: the same floats
            picked = torch.log_softmax(scores, dim=-1).gather(-1, token[:, None])[:, 0]  # [b]
            if logprobs is None:
                logprobs = torch.zeros(B, T_max, dtype=picked.dtype, device=device)
            response_ids[rows, t] = token
            logprobs[rows, t] = picked
            T = t + 1
            unfinished &= token != eos
            if t == T_max - 1 or not bool(unfinished.any()):
                break
            done = int((~unfinished).sum())
            if compact and done and done >= self.compact_at * rows.numel():
                keep = unfinished.nonzero().squeeze(1)  # [b'] decode rows still running
                cache.batch_select_indices(keep)
                rows, unfinished, token = rows[keep], unfinished[keep], token[keep]
                attention, next_position = attention[keep], next_position[keep]
                if generators is not None:
                    generators = [generators[i] for i in keep.tolist()]
            out = model(
                input_ids=token[:, None],
                attention_mask=attention[:, : Lp + t + 1],
                position_ids=next_position + t,
                use_cache=True,
                **{cache_arg: cache},
            )
            logits = out.logits[:, -1].float()

        response_ids = response_ids[:, :T]  # [B, T]
        mask, truncated = response_mask_from_tokens(response_ids, eos)
        sampler_logprobs = logprobs[:, :T]  # [B, T]
        sampler_logprobs = torch.where(mask, sampler_logprobs, torch.zeros_like(sampler_logprobs))
        return RolloutBatch(
            prompt_ids, prompt_mask, response_ids, mask, sampler_logprobs, truncated, G
        )


def _multinomial_over_all_rows(probs: Tensor, rows: Tensor, B: int) -> Tensor:
    """One ``torch.multinomial`` draw per row of the full batch; the tokens of ``rows``: [b].

    probs [b, V] are the distributions of the decode rows, ``rows`` [b] their batch rows. The
    draw is made over all B rows (rows no longer decoded get a uniform placeholder), so it
    consumes the random stream exactly as a draw over the uncompacted batch does, and each row's
    token depends only on its own distribution and its own share of the stream.
    """
    if rows.numel() == B:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    full = torch.ones(B, probs.shape[-1], dtype=probs.dtype, device=probs.device)  # [B, V]
    full[rows] = probs
    return torch.multinomial(full, num_samples=1).squeeze(1)[rows]
