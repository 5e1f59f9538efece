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
from seqrl.train.dist import DistInfo, all_reduce_grads, all_reduce_sum, any_rank
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
    """
    B = mask.shape[0]
    acc, skipped = MetricAccumulator(), 0
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(B * dist.world_size, generator=generator)
        for minibatch in minibatch_rows(order, settings.num_minibatches, B, dist):
            finite = _accumulate(
                params, loss_fn, minibatch, mask, settings, dist, summed, acc, tokens
            )
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, settings.grad_clip if settings.grad_clip is not None else math.inf
            )
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
    tokens: Tensor | None = None,
) -> bool:
    """One minibatch's gradient in ``params`` (all ranks) and its metrics; True when finite."""
    total_tokens, total_sequences = global_normalizers(mask[minibatch], dist)
    finite, deferring = True, False
    shares = torch.zeros(len(summed) + 1, dtype=torch.float64)  # [summed…, denominator]
    micros = micro_batches(
        minibatch, tokens, max_rows=settings.micro_batch_size, max_tokens=settings.max_tokens
    )
    for micro in micros if minibatch.numel() else ():
        out = loss_fn(micro, total_tokens, total_sequences)
        finite &= bool(torch.isfinite(out.loss))
        out.loss.backward()
        for i, key in enumerate(summed):
            shares[i] += out.metrics[key].double().cpu()
        if out.denominator is not None:
            deferring = True
            shares[-1] += out.denominator.double().cpu()
        acc.add({k: v for k, v in out.metrics.items() if k not in summed})
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
