"""The optimiser pass over one rollout, shared by the policy and both critics.

    for epoch in range(ppo_epochs):
        order = a permutation of every rank's rows                  (one generator, all ranks)
        for minibatch in order.chunk(num_minibatches):              (this rank's rows of it)
            normalisers = the minibatch's tokens and sequences over all ranks
            for micro in minibatch cut by micro_batch_size rows (or max_tokens tokens):
                out = loss_fn(micro, normalisers); out.loss.backward()
            sum gradients over ranks, divide by Σ deferred denominators (if the loss defers)
            clip; step if loss and gradient are finite on every rank, else skip and count

The micro-batch losses are shares of the minibatch loss (they divide by the minibatch's
normaliser, spec §0.3), so their gradients add up to the minibatch gradient whatever the
micro-batch size, and under ``torchrun`` to the gradient one process holding every row takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.core import LossOutput
from seqrl.train import sharding
from seqrl.train.dist import DistInfo, all_reduce_grads, all_reduce_sum, any_rank, gather_cat
from seqrl.train.forward import micro_batches
from seqrl.train.metrics import MetricAccumulator

# (micro-batch rows [b], minibatch total_tokens, minibatch total_sequences) → the rows' loss share
LossFn = Callable[[Tensor, Tensor, Tensor], LossOutput]


@dataclass(frozen=True)
class PassSettings:
    """How one rollout is cut into optimiser steps."""

    num_minibatches: int  # optimiser steps per epoch
    ppo_epochs: int
    micro_batch_size: int  # rows per forward/backward
    grad_clip: float | None  # None: no clipping (the norm is still measured)
    max_tokens: int | None = None  # token budget per forward/backward (replaces the row count)


def minibatch_rows(
    order: Tensor, num_minibatches: int, local_rows: int, dist: DistInfo, first: int | None = None
) -> list[Tensor]:
    """This rank's local row indices of each minibatch of a global permutation ``order``.

    Rank r holds global rows [lo, lo + b), b = ``local_rows``, lo = ``first`` (default r·b:
    every rank holds b rows); minibatch m is the m-th equal chunk of ``order`` over all ranks,
    exactly as one process holding every row splits it. On one process this is
    ``order.chunk(num_minibatches)``.
    """
    lo = dist.rank * local_rows if first is None else first
    out = []
    for minibatch in order.chunk(num_minibatches):
        mine = (minibatch >= lo) & (minibatch < lo + local_rows)
        out.append(minibatch[mine] - lo)
    return out


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters ``optimizer`` steps, in order (what the pass reduces and clips)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def global_normalizers(mask: Tensor, dist: DistInfo) -> tuple[Tensor, Tensor]:
    """(total_tokens, total_sequences) of the minibatch over all ranks, each at least 1.

    ``mask`` [b, T] is this rank's part of the minibatch (b may be 0).
    """
    if not dist.active:
        return C.normalizers(mask)
    local = torch.stack([mask.sum(), (mask.sum(dim=-1) > 0).sum()])  # [2] int64
    tokens, sequences = all_reduce_sum(local, dist).clamp(min=1)
    return tokens, sequences


def optimizer_pass(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    mask: Tensor,
    settings: PassSettings,
    generator: torch.Generator,
    dist: DistInfo,
    summed: Sequence[str],
    grad_norm_key: str,
    after_step: Callable[[], None] | None = None,
    pad: sharding.Padding | None = None,
    tokens: Tensor | None = None,
) -> tuple[MetricAccumulator, int]:
    """``ppo_epochs`` × ``num_minibatches`` optimiser steps; returns (metrics, skipped steps).

    ``mask`` [B, T] marks the rows' counted tokens (the normalisers; a per-row loss passes a
    [B, 1] all-True mask). ``summed`` names the loss metrics that are shares of the minibatch
    loss: they are summed over the micro-batches and ranks of a minibatch, then averaged over
    minibatches; every other metric is averaged over micro-batches (extremes keep the extreme).
    A loss that returns a ``denominator`` (see :class:`seqrl.core.LossOutput`) has its
    gradients and summed metrics divided by the minibatch's total denominator.
    ``after_step`` runs after every optimiser step taken. Every call of ``loss_fn`` returns
    the ``summed`` metrics. ``tokens`` [B] (each row's real tokens) lets ``settings.max_tokens``
    cut micro-batches by token budget (:func:`seqrl.train.forward.micro_batches`).

    Under FSDP (``params`` are DTensor shards) FSDP sums the gradients in each backward, and
    ``pad`` (:class:`seqrl.train.sharding.Padding`) makes as many forward/backward passes on
    every process as on the one with the most micro-batches in the minibatch.
    """
    B = mask.shape[0]
    sharded = sharding.has_sharded_params(params)
    rows = gather_cat(torch.tensor([B]), dist).tolist()  # every rank's row count (may differ)
    acc, skipped = MetricAccumulator(), 0
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(sum(rows), generator=generator)
        first = sum(rows[: dist.rank])
        for minibatch in minibatch_rows(order, settings.num_minibatches, B, dist, first):
            finite = _accumulate(
                params, loss_fn, minibatch, mask, settings, dist, summed, acc, pad, sharded, tokens
            )
            max_norm = settings.grad_clip if settings.grad_clip is not None else math.inf
            if sharded:
                grad_norm = sharding.clip_grad_norm_(params, max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            finite = not any_rank(not finite, dist)
            if finite and math.isfinite(grad_norm.item()):
                optimizer.step()
                acc.add({grad_norm_key: grad_norm})
                if after_step is not None:
                    after_step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    return acc, skipped


def _accumulate(
    params: list[torch.nn.Parameter],
    loss_fn: LossFn,
    minibatch: Tensor,
    mask: Tensor,
    settings: PassSettings,
    dist: DistInfo,
    summed: Sequence[str],
    acc: MetricAccumulator,
    pad: sharding.Padding | None = None,
    sharded: bool = False,
    tokens: Tensor | None = None,
) -> bool:
    """One minibatch's gradient in ``params`` (all ranks) and its metrics; True when finite."""
    total_tokens, total_sequences = global_normalizers(mask[minibatch], dist)
    finite, deferring = True, False
    shares = torch.zeros(len(summed) + 1, dtype=torch.float64)  # [summed…, denominator]
    micros = (
        micro_batches(
            minibatch, tokens, max_rows=settings.micro_batch_size, max_tokens=settings.max_tokens
        )
        if minibatch.numel()
        else ()
    )
    most = len(micros) if pad is None else pad.most(len(micros))
    for micro in micros:
        out = loss_fn(micro, total_tokens, total_sequences)
        finite &= bool(torch.isfinite(out.loss))
        out.loss.backward()
        for i, key in enumerate(summed):
            shares[i] += out.metrics[key].double().cpu()
        if out.denominator is not None:
            deferring = True
            shares[-1] += out.denominator.double().cpu()
        acc.add({k: v for k, v in out.metrics.items() if k not in summed})
    if pad is not None:
        pad.run(most - len(micros))  # FSDP: as many forward/backward passes as the busiest process
    if not sharded:  # FSDP reduce-scattered the sums in each backward
        all_reduce_grads(params, dist)
    if dist.active:
        shares = all_reduce_sum(shares, dist)
        deferring = any_rank(deferring, dist)
    if deferring:  # the loss returned sums: divide by the minibatch's denominator
        denominator = shares[-1]
        if denominator > 0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(denominator.item())
        shares[:-1] /= denominator.clamp(min=1)
    acc.add({key: shares[i] for i, key in enumerate(summed)})
    return finite
