"""One RL step after the rollout: log-probs, advantages, and the minibatch updates.

rollout (B = P·G rows) ─► rewards [B] ─► advantages [B]
    ─► old log-probs (recomputed at θ_old, or the sampler's) and reference log-probs
    ─► for epoch: for minibatch: for micro-batch: core.policy_loss → backward
           clip grad, optimizer step   (skipped, and counted, if anything is non-finite)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.rollout import RolloutBatch
from seqrl.train.dist import (
    SINGLE,
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    any_rank,
    reduce_sums,
)
from seqrl.train.metrics import MetricAccumulator


@dataclass(frozen=True)
class UpdateSettings:
    """The parts of the run config one update needs (no config object enters this module)."""

    loss_name: str
    loss_overrides: dict
    num_minibatches: int
    ppo_epochs: int
    micro_batch_size: int
    grad_clip: float | None  # None: no clipping (the norm is still measured)
    temperature: float
    # train–inference mismatch correction (seqrl.core.mismatch): none | truncate | mask
    mismatch_correction: str = "none"
    mismatch_level: str = "token"  # token | sequence
    mismatch_cap: float = 2.0  # C
    shared_prefix: bool = False  # one prompt forward per group (see shared_prefix_logits)


def _trim(ids: Tensor, mask: Tensor, *, left: bool) -> tuple[Tensor, Tensor]:
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
    prompt_ids, prompt_mask = _trim(batch.prompt_ids[rows], batch.prompt_mask[rows], left=True)
    resp_ids, resp_mask = _trim(batch.response_ids[rows], batch.response_mask[rows], left=False)
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
    prompt_ids, prompt_mask = _trim(batch.prompt_ids[rows], batch.prompt_mask[rows], left=True)
    resp_ids, resp_mask = _trim(batch.response_ids[rows], batch.response_mask[rows], left=False)
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
    return torch.cat(parts) if parts else batch.sampler_logprobs.clone()


def score_rollout(tokenizer, task, batch: RolloutBatch, examples: list) -> tuple[list[str], Tensor]:
    """Decode the responses and score each against its prompt's example: (texts, rewards [B]).

    ``examples`` has one entry per prompt; row i of the batch belongs to examples[i // G].
    """
    texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    grouped = [e for e in examples for _ in range(batch.group_size)]
    return texts, torch.tensor(task.score_batch(texts, grouped))


def compute_advantages(
    kind: str, rewards: Tensor, group_size: int, *, eps: float, greedy_rewards: Tensor | None = None
) -> Tensor:
    """Sequence-level advantages [B] for the estimators a config can name."""
    if kind == "group":
        return C.group_advantages(rewards, group_size, eps=eps)
    if kind == "group_centered":
        return C.group_centered_advantages(rewards, group_size)
    if kind == "rloo":
        return C.rloo_advantages(rewards, group_size)
    if kind == "remax":
        if greedy_rewards is None:
            raise ValueError("remax needs the rewards of the greedy responses")
        return C.remax_advantages(rewards, greedy_rewards.repeat_interleave(group_size))
    raise ValueError(f"unknown advantage estimator {kind!r}")


def minibatch_rows(
    order: Tensor, num_minibatches: int, local_rows: int, dist: DistInfo
) -> list[Tensor]:
    """This rank's local row indices of each minibatch of a global permutation ``order``.

    Rank r holds global rows [r·b, (r + 1)·b), b = ``local_rows``; minibatch m is the m-th
    equal chunk of ``order`` over all ranks, exactly as one process holding every row splits
    it. On one process this is ``order.chunk(num_minibatches)``.
    """
    lo = dist.rank * local_rows
    out = []
    for minibatch in order.chunk(num_minibatches):
        mine = (minibatch >= lo) & (minibatch < lo + local_rows)
        out.append(minibatch[mine] - lo)
    return out


def global_normalizers(mask: Tensor, dist: DistInfo) -> tuple[Tensor, Tensor]:
    """(total_tokens, total_sequences) of the minibatch over all ranks, each at least 1.

    ``mask`` [b, T] is this rank's part of the minibatch (b may be 0).
    """
    if not dist.active:
        return C.normalizers(mask)
    local = torch.stack([mask.sum(), (mask.sum(dim=-1) > 0).sum()])  # [2] int64
    tokens, sequences = all_reduce_sum(local, dist).clamp(min=1)
    return tokens, sequences


def update_policy(
    model,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    settings: UpdateSettings,
    generator: torch.Generator,
    dist: DistInfo = SINGLE,
    routing=None,
) -> tuple[dict[str, float], int]:
    """``ppo_epochs`` × ``num_minibatches`` optimizer steps on one rollout.

    Returns (metrics averaged over micro-batches, number of skipped non-finite updates).
    The loss normaliser is the minibatch's (``total_tokens`` / ``total_sequences``), so
    the micro-batch size does not change the gradient (spec §0.3).

    Under ``torchrun`` ``batch`` holds this rank's rows (the same count on every rank): the
    minibatches are chunks of one permutation of the global rows, the normalisers are counted
    over all ranks, and the gradients are summed over ranks before clipping, so every rank
    takes the step one process would take on the whole batch.

    ``old_logprobs=None`` means a single on-policy update (one minibatch, one epoch): then
    θ = θ_old during the only forward, so π_old is the detached current log-prob, exactly,
    and the separate recompute pass is skipped.

    ``routing`` (MoE policies): the :class:`seqrl.train.routing.RolloutRouting` that recorded
    this rollout's routing in :func:`batch_logprobs`; it replays it (if so configured) and adds
    the ``moe/*`` metrics.
    """
    if old_logprobs is None and settings.num_minibatches * settings.ppo_epochs != 1:
        raise ValueError("old_logprobs may only be omitted for a single on-policy update")
    cfg = C.resolve_policy_loss_config(settings.loss_name, **settings.loss_overrides)
    drop_rule = cfg.future_kl_weights and cfg.drop_dual_clipped_sequences
    correct = settings.mismatch_correction != "none"
    B = batch.response_ids.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    acc, skipped = MetricAccumulator(), 0
    if routing is not None:
        routing.begin_updates()
    # the model stays in eval mode: dropout would make π_θ random, so that the ratio at θ = θ_old
    # is not 1 and the sampler's, π_old's and the update's log-probs would disagree
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(B * dist.world_size, generator=generator)
        for minibatch in minibatch_rows(order, settings.num_minibatches, B, dist):
            total_tokens, total_sequences = global_normalizers(batch.response_mask[minibatch], dist)
            if (
                drop_rule
            ):  # exact accumulation with FIPO's drop rule: sum, then divide (see policy_loss)
                total_tokens = torch.ones((), dtype=torch.float32)
            kept_tokens = torch.zeros((), dtype=torch.float64)
            finite, pending = True, []
            for micro in minibatch.split(settings.micro_batch_size) if minibatch.numel() else ():
                mask = batch.response_mask[micro]
                logprobs, entropy = response_logprobs(
                    model,
                    batch,
                    micro,
                    temperature=settings.temperature,
                    with_entropy=True,
                    routing=routing,
                    shared_prefix=settings.shared_prefix,
                )
                old = logprobs.detach() if old_logprobs is None else old_logprobs[micro]
                sampler_lp = batch.sampler_logprobs[micro]
                is_weights = None
                if correct:
                    is_weights = C.mismatch_weights(
                        old,
                        sampler_lp,
                        mask,
                        level=settings.mismatch_level,
                        mode=settings.mismatch_correction,
                        cap=settings.mismatch_cap,
                    )  # [b, T]
                out = C.policy_loss(
                    settings.loss_name,
                    logprobs=logprobs,
                    old_logprobs=old,
                    advantages=advantages[micro],
                    mask=mask,
                    ref_logprobs=None if ref_logprobs is None else ref_logprobs[micro],
                    total_tokens=total_tokens,
                    total_sequences=total_sequences,
                    is_weights=is_weights,
                    **settings.loss_overrides,
                )
                finite &= bool(torch.isfinite(out.loss))
                out.loss.backward()
                if drop_rule:
                    kept_tokens += out.metrics["fipo/kept_tokens"].double().cpu()
                extra = C.mismatch_metrics(
                    old, sampler_lp, mask, cap=settings.mismatch_cap if correct else None
                )
                if is_weights is not None:
                    extra["mismatch/weight_mean"] = C.masked_mean(is_weights, mask)
                pending.append(
                    out.metrics | extra | {"policy/entropy": C.masked_mean(entropy, mask)}
                )
            all_reduce_grads(params, dist)
            if drop_rule:
                kept_tokens = all_reduce_sum(kept_tokens, dist)
                if kept_tokens > 0:
                    for p in params:
                        if p.grad is not None:
                            p.grad.div_(kept_tokens.item())
            for metrics in pending:  # with the drop rule the losses were token sums: divide too
                for key in ("loss/policy", "loss/kl"):
                    if drop_rule and key in metrics:
                        metrics[key] = metrics[key] / kept_tokens.clamp(min=1).to(
                            metrics[key].device
                        )
                acc.add(metrics)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, settings.grad_clip if settings.grad_clip is not None else math.inf
            )
            finite = not any_rank(not finite, dist)
            if finite and math.isfinite(grad_norm.item()):
                optimizer.step()
                acc.add({"policy/grad_norm": grad_norm})
                if routing is not None:
                    routing.optimizer_stepped()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    if routing is not None:
        acc.add(routing.metrics())
    return reduce_sums(acc.sums(), dist) if dist.active else acc.means(), skipped
