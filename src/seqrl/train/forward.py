"""Forward passes over a rollout batch: policy log-probs and critic values.

Every forward lays out prompt + response exactly as generation did (left-padded prompts,
position ids counting real tokens only), so at θ_old the recomputed log-probs match the
sampler's up to float rounding, and a critic reads its values at the same positions.

    response_logprobs(model, batch, rows)   log π(y_t | x, y_<t)       [b, T]  (+ entropy)
    batch_logprobs(model, batch)            the same for every row, no gradient   [B, T]
    prompt_value_logits(critic, ids, mask)  scalar critic z(prompt)    [b]
    token_values(critic, batch, rows)       token critic V(s_t)        [b, T]
    batch_values(critic, batch, kind)       either, every row, no gradient
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.rollout import RolloutBatch
from seqrl.train.sharding import Padding


def trim(ids: Tensor, mask: Tensor, *, left: bool) -> tuple[Tensor, Tensor]:
    """Drop columns that are padding in every row (left for prompts, right for responses)."""
    used = mask.any(dim=0).nonzero()
    if used.numel() == 0:
        return ids[:, :1], mask[:, :1]
    lo, hi = (int(used[0]), ids.shape[1]) if left else (0, int(used[-1]) + 1)
    return ids[:, lo:hi], mask[:, lo:hi]


def joint_inputs(batch: RolloutBatch, rows: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Model inputs for prompt + response of ``rows`` as generation laid them out, trimmed.

    Returns (``input_ids`` / ``attention_mask`` / ``position_ids`` [b, Lp + T], the trimmed
    response ids [b, T] and mask [b, T]); position ids count real tokens only, as ``generate``'s
    do for left-padded prompts.
    """
    prompt_ids, prompt_mask = trim(batch.prompt_ids[rows], batch.prompt_mask[rows], left=True)
    resp_ids, resp_mask = trim(batch.response_ids[rows], batch.response_mask[rows], left=False)
    attention = torch.cat([prompt_mask, resp_mask], dim=1)  # [b, Lp + T]
    inputs = {
        "input_ids": torch.cat([prompt_ids, resp_ids], dim=1),  # [b, Lp + T]
        "attention_mask": attention.long(),
        "position_ids": (attention.long().cumsum(dim=1) - 1).clamp(min=0),
    }
    return inputs, resp_ids, resp_mask


def shared_prefix_logits(
    model, batch: RolloutBatch, rows: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Response logits [b, T, V] for ``rows`` with one prompt forward per group, not per row.

    The G rows of a group share their prompt, so the prompt runs once per distinct group in
    ``rows`` (with ``use_cache``), its KV cache is gathered out to the rows, and the responses run
    on top of it. Causal attention means the prompt's hidden states never see the response, so
    this is the joint forward of :func:`joint_inputs` computed in two pieces: the same logits up to
    float rounding, and gradients flow into the shared prompt pass once per row that used it.
    Returns (logits, trimmed response ids [b, T], mask [b, T]), or None when nothing is shared
    (G = 1, one row per group in ``rows``, or rows of a group whose prompts differ).
    """
    groups = rows // batch.group_size  # [b]
    unique, inverse = torch.unique(groups, return_inverse=True)  # [U], [b]
    if unique.numel() == rows.numel():
        return None
    prompt_ids, prompt_mask = trim(batch.prompt_ids[rows], batch.prompt_mask[rows], left=True)
    resp_ids, resp_mask = trim(batch.response_ids[rows], batch.response_mask[rows], left=False)
    b, T = resp_ids.shape
    first = torch.full((unique.numel(),), b).scatter_reduce(
        0, inverse, torch.arange(b), reduce="amin"
    )  # [U] first row of each group
    if not torch.equal(prompt_ids[first][inverse], prompt_ids):
        return None
    attention = torch.cat([prompt_mask, resp_mask], dim=1).long()  # [b, Lp + T]
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # as joint_inputs
    Lp = prompt_ids.shape[1]
    out = model(
        input_ids=prompt_ids[first],
        attention_mask=attention[first, :Lp],
        position_ids=positions[first, :Lp],
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1:][inverse]  # [b, 1, V] predicts response token 0
    if T > 1:
        cache = out.past_key_values
        cache.batch_select_indices(inverse)
        rest = model(
            input_ids=resp_ids[:, :-1],
            attention_mask=attention[:, :-1],
            position_ids=positions[:, Lp:-1],
            past_key_values=cache,
            use_cache=True,
        ).logits  # [b, T − 1, V] position t predicts response token t + 1
        logits = torch.cat([logits, rest], dim=1)
    return logits, resp_ids, resp_mask


def response_logprobs(
    model,
    batch: RolloutBatch,
    rows: Tensor,
    *,
    temperature: float,
    with_entropy: bool = False,
    routing=None,
    shared_prefix: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) at the sampled tokens for ``rows`` of the batch: [b, T] (+ entropy [b, T]).

    The same left-padded prompt and position ids as generation, so at θ_old these match the
    sampler's log-probs up to float rounding. Columns that are padding in all ``rows`` are
    trimmed first; the result is padded back to the batch's T with zeros. ``routing`` (an MoE
    policy's :class:`seqrl.train.routing.RolloutRouting`) records or replays the forward's routing.
    ``shared_prefix`` runs each group's prompt once (:func:`shared_prefix_logits`).
    """
    if shared_prefix and routing is not None:
        raise ValueError("shared_prefix does not record or replay MoE routing; turn it off")
    shared = shared_prefix_logits(model, batch, rows) if shared_prefix else None
    if shared is not None:
        logits, resp_ids, resp_mask = shared  # [b, T, V]
        T = resp_ids.shape[1]
    else:
        inputs, resp_ids, resp_mask = joint_inputs(batch, rows)
        T = resp_ids.shape[1]
        width = inputs["input_ids"].shape[1]
        with nullcontext() if routing is None else routing.forward(batch, rows, width, resp_mask):
            out = model(**inputs, use_cache=False, logits_to_keep=T + 1)
        logits = out.logits[:, :-1]  # [b, T, V]  position t predicts response token t
    logprobs = C.token_logprobs(logits, resp_ids, temperature=temperature)  # [b, T]
    logprobs = torch.where(resp_mask, logprobs, torch.zeros_like(logprobs))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = C.token_entropy(logits, temperature=temperature)
    pad = batch.response_ids.shape[1] - T
    logprobs = torch.nn.functional.pad(logprobs, (0, pad))
    if entropy is not None:
        entropy = torch.nn.functional.pad(entropy, (0, pad))
    return logprobs, entropy


@torch.no_grad()
def batch_logprobs(
    model,
    batch: RolloutBatch,
    *,
    temperature: float,
    micro_batch_size: int,
    routing=None,
    shared_prefix: bool = False,
) -> Tensor:
    """Log-probs of every row under ``model`` (no gradient), in micro-batches: [B, T].

    With ``routing``, the rollout's routing at these parameters (θ_old) is recorded.
    """
    B = batch.response_ids.shape[0]
    if routing is not None:
        routing.start(batch)
    padding = Padding(model)  # FSDP: as many forwards as the process with the most rows
    most = padding.most(math.ceil(B / micro_batch_size))
    parts = [
        response_logprobs(
            model,
            batch,
            torch.arange(s, min(s + micro_batch_size, B)),
            temperature=temperature,
            routing=routing,
            shared_prefix=shared_prefix,
        )[0]
        for s in range(0, B, micro_batch_size)
    ]
    padding.run(most - len(parts))
    return torch.cat(parts) if parts else batch.sampler_logprobs.clone()


def _wide(x: Tensor) -> Tensor:
    """float32 or wider (bf16 critics are read out in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prompt_value_logits(critic, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """The critic's output at the last prompt token, from a prompt-only forward: [B].

    prompt_ids, prompt_mask [B, Lp] are left-padded, so column −1 is every row's last real
    token; position ids count real tokens only, so left padding does not move the value, and
    no response token is ever passed in (invariant 16).
    """
    ids, mask = trim(prompt_ids, prompt_mask, left=True)  # [B, Lp']
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = critic(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False)
    return _wide(out.logits[:, -1, 0])  # [B]


def token_values(critic, batch: RolloutBatch, rows: Tensor) -> Tensor:
    """V(s_t) for every response token t of ``rows``: [b, T], 0 on padding.

    s_t = prompt + y_<t, so V(s_t) is read at the position just before token t (the last
    prompt token for t = 0), verl's convention. Same left-padded layout as the policy forward.
    """
    inputs, resp_ids, resp_mask = joint_inputs(batch, rows)  # [b, Lp + T]
    T = resp_ids.shape[1]
    Lp = inputs["input_ids"].shape[1] - T
    out = critic(**inputs, use_cache=False)
    values = _wide(out.logits[:, Lp - 1 : Lp - 1 + T, 0])  # [b, T]
    values = torch.where(resp_mask, values, torch.zeros_like(values))
    return torch.nn.functional.pad(values, (0, batch.response_ids.shape[1] - T))


@torch.no_grad()
def batch_values(critic, batch: RolloutBatch, kind: str, micro_batch_size: int) -> Tensor:
    """Critic outputs for the whole batch without gradient: logits [B] or values [B, T]."""
    B = batch.response_ids.shape[0]
    padding = Padding(critic)  # FSDP: as many forwards as the process with the most rows
    most = padding.most(math.ceil(B / micro_batch_size))
    parts = []
    for s in range(0, B, micro_batch_size):
        rows = torch.arange(s, min(s + micro_batch_size, B))
        if kind == "scalar":
            parts.append(
                prompt_value_logits(critic, batch.prompt_ids[rows], batch.prompt_mask[rows])
            )
        else:
            parts.append(token_values(critic, batch, rows))
    padding.run(most - len(parts))
    if not parts:  # no rows on this process (kept groups rebalanced over processes)
        shape = batch.response_ids.shape[: 1 if kind == "scalar" else 2]
        return torch.zeros(shape, device=batch.response_ids.device)
    return torch.cat(parts)
