"""Forward passes over a rollout batch: policy log-probs and critic values.

Every forward lays out prompt + response exactly as generation did (left-padded prompts,
position ids counting real tokens only), so at θ_old the recomputed log-probs match the
sampler's up to float rounding, and a critic reads its values at the same positions.

    response_logprobs(model, batch, rows)   log π(y_t | x, y_<t)       [b, T]  (+ entropy)
    batch_logprobs(model, batch)            the same for every row, no gradient   [B, T]
    prompt_value_logits(critic, ids, mask)  scalar critic z(prompt)    [b]
    token_values(critic, batch, rows)       token critic V(s_t)        [b, T]
    batch_values(critic, batch, kind)       either, every row, no gradient
    micro_batches(rows, tokens, ...)        rows → micro-batches, by row count or token budget

Three layouts compute the same forward (exact in exact arithmetic, tested against each other):

    joint    [b, Lp + T]: every row padded to the longest prompt and response (the reference)
    shared   each group's prompt once, its KV cache gathered out to the G responses
    packed   [n, L]: the rows' real tokens laid end to end in n ≤ b rows of the longest row's
             length, position ids restarting at 0 for every sequence; the attention mask is
             block-diagonal, so no token sees another sequence, and no padding is computed

:func:`forward_layout` picks, per micro-batch, the allowed layout that runs the fewest token
positions. Per-sequence quantities (GSPO's ratio, FIPO's future-KL, GAE) never see the layout:
every forward hands back [b, T] tensors laid out as the batch is.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.models.cache import cache_keyword, returned_cache
from seqrl.rollout import RolloutBatch
from seqrl.train.routing import scoring_positions
from seqrl.train.sharding import Padding, is_sharded


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
    (G = 1, one row per group in ``rows``, or rows of a group whose prompts differ) or the model
    returns no transformers ``Cache``.
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
    cache = returned_cache(out)
    if T > 1 and not hasattr(cache, "batch_select_indices"):  # no transformers Cache came back
        return None
    if T > 1:
        cache.batch_select_indices(inverse)
        rest = model(
            input_ids=resp_ids[:, :-1],
            attention_mask=attention[:, :-1],
            position_ids=positions[:, Lp:-1],
            use_cache=True,
            **{cache_keyword(model): cache},
        ).logits  # [b, T − 1, V] position t predicts response token t + 1
        logits = torch.cat([logits, rest], dim=1)
    return logits, resp_ids, resp_mask


# ------------------------------------------------------------------ micro-batches


def row_tokens(batch: RolloutBatch, *, prompt_only: bool = False) -> Tensor:
    """Real (unpadded) tokens of every row: prompt + response, or the prompt alone: [B]."""
    tokens = batch.prompt_mask.sum(dim=-1)
    return tokens if prompt_only else tokens + batch.response_mask.sum(dim=-1)


def micro_batches(
    rows: Tensor, tokens: Tensor | None, *, max_rows: int, max_tokens: int | None
) -> list[Tensor]:
    """``rows`` cut into micro-batches (one forward/backward each).

    ``max_tokens`` None: ``max_rows`` rows each, in order (``rows.split(max_rows)``). Otherwise
    by token budget: the rows sorted by ``tokens`` [B] (longest first, ties in order), then cut
    so that each micro-batch holds at most ``max_tokens`` real tokens (a longer row goes
    alone). Sorting puts rows of similar length together, so a padded forward wastes little and
    a packed one fills its rows.
    """
    if rows.numel() == 0:
        return []
    if max_tokens is None or tokens is None:
        return list(rows.split(max_rows))
    counts = tokens[rows]  # [b]
    order = torch.argsort(counts, descending=True, stable=True)
    out, current, used = [], [], 0
    for i, n in zip(order.tolist(), counts[order].tolist(), strict=True):
        if current and used + n > max_tokens:
            out.append(rows[torch.tensor(current, dtype=torch.long, device=rows.device)])
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        out.append(rows[torch.tensor(current, dtype=torch.long, device=rows.device)])
    return out


def _in_row_order(parts: list[Tensor], micros: list[Tensor]) -> Tensor:
    """The micro-batches' outputs concatenated, rows back in the order of their indices."""
    out = torch.cat(parts)
    rows = torch.cat(micros)
    if torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
        return out  # micro-batches in order (no token budget): nothing to move
    result = torch.empty_like(out)
    result[rows] = out
    return result


# ------------------------------------------------------------------ packing


def pack_rows(lengths: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """First-fit decreasing: (pack row of each sequence, its offset there, number of pack rows).

    Every sequence is placed whole in the first row (of ``capacity`` tokens) it fits in,
    longest first; ``capacity`` must be at least the longest length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []  # room left in each pack row
    row, offset = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        n = lengths[i]
        r = next((j for j, room in enumerate(free) if n <= room), len(free))
        if r == len(free):
            free.append(capacity)
        row[i], offset[i] = r, capacity - free[r]
        free[r] -= n
    return row, offset, len(free)


@dataclass(frozen=True)
class Packed:
    """Sequences laid end to end in ``n`` rows of ``L`` tokens, and where the outputs go back.

    The model gets ``input_ids`` and ``position_ids`` and no attention mask: transformers reads
    positions that restart at 0 as sequence starts and masks attention block-diagonally (what
    :func:`packing_support` checks for each model). The tail of a pack row is filler, a
    sequence of its own whose outputs are never read.
    """

    input_ids: Tensor  # [n, L]
    position_ids: Tensor  # [n, L] 0, 1, … within every sequence
    keep: Tensor  # [n, L] bool: the positions whose outputs are wanted
    order: Tensor  # [K] packed output index of each wanted position, in the caller's order


def pack(ids: Tensor, real: Tensor, keep: Tensor) -> Packed:
    """Pack the rows of a padded layout: ``ids``, ``real`` (True = real token), ``keep`` [b, W].

    Each row's real tokens must be contiguous (left-padded prompt + right-padded response
    are). The model's outputs at ``packed.keep``, indexed by ``packed.order``, come back in
    the row-major order of ``keep`` in the padded layout, so ``padded[keep] = outputs``.
    """
    lengths = real.sum(dim=1)  # [b]
    L = int(lengths.max())
    bins, offsets, n = pack_rows(lengths.tolist(), L)
    device = ids.device
    r, c = real.nonzero(as_tuple=True)  # [N] every real token, row-major
    position = (real.long().cumsum(dim=1) - 1)[r, c]  # [N] position within its sequence
    start = torch.tensor(bins, device=device) * L + torch.tensor(offsets, device=device)  # [b]
    dest = start[r] + position  # [N] flat index in the [n, L] layout
    used = torch.zeros(n, dtype=torch.long, device=device).index_add_(
        0, torch.tensor(bins, device=device), lengths
    )  # [n] real tokens per pack row
    flat_ids = torch.zeros(n * L, dtype=ids.dtype, device=device)
    flat_ids[dest] = ids[r, c]
    flat_pos = (torch.arange(L, device=device) - used[:, None]).clamp(min=0).flatten()  # filler
    flat_pos[dest] = position
    kept = dest[keep[r, c]]  # [K] flat index of each wanted output, in the caller's order
    flat_keep = torch.zeros(n * L, dtype=torch.bool, device=device)
    flat_keep[kept] = True
    return Packed(
        flat_ids.view(n, L), flat_pos.view(n, L), flat_keep.view(n, L), kept.argsort().argsort()
    )


def packed_outputs(model, packed: Packed, *, logits_mask: bool = False) -> Tensor:
    """The model's logits at the wanted positions of a packed layout: [K, V].

    ``logits_mask``: hand ``keep`` to the model as ``logits_to_keep`` (transformers' 2-D boolean
    form), so no logits are computed for positions nobody reads.
    """
    kwargs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    if logits_mask:
        logits = model(**kwargs, logits_to_keep=packed.keep).logits  # [K, V] in packed order
    else:
        logits = model(**kwargs).logits[packed.keep]  # [K, V]
    return logits[packed.order]


@dataclass(frozen=True)
class PackingSupport:
    """What :func:`packing_support` found for one model."""

    exact: bool  # packed forwards equal separate ones (sequences cannot see each other)
    logits_mask: bool  # the model accepts a 2-D boolean logits_to_keep
    reason: str | None = None  # why packing is off for this model


_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _module(model):
    """The torch module behind ``model`` (a LoRA reference's adapters-off wrapper holds one)."""
    return model if isinstance(model, torch.nn.Module) else model.model


def packing_support(model) -> PackingSupport:
    """Whether ``model`` computes packed sequences exactly; probed once per model, then cached.

    Two short sequences s1, s2 are run packed (positions restarting) and s2 alone. Packing is
    exact when s2's packed logits do not change beyond float rounding when s1's tokens change
    (attention never crosses a sequence boundary) and equal s2's own logits up to float rounding
    (the positions restart). transformers 5 reads restarting position ids as packing for every attention
    implementation that builds its mask with ``masking_utils`` (sdpa, eager, flex, flash); a
    model that builds its own mask, or ignores ``position_ids``, fails the probe and runs padded.
    """
    key = _module(model)
    found = _SUPPORT.get(key)
    if found is None:
        found = _probe_packing(model)
        _SUPPORT[key] = found
        if found.reason is not None:
            import warnings

            warnings.warn(
                f"{type(key).__name__}: {found.reason}; its forwards run padded "
                "(algo.packing has no effect for it)",
                stacklevel=3,
            )
    return found


@torch.no_grad()
def _probe_packing(model) -> PackingSupport:
    module = _module(model)
    try:
        vocab = module.get_input_embeddings().num_embeddings
        device = next(module.parameters()).device
    except (AttributeError, StopIteration) as err:
        return PackingSupport(False, False, f"packing could not be probed ({err})")
    s1 = (torch.arange(5, device=device) * 7 + 3) % vocab
    s2 = (torch.arange(6, device=device) * 5 + 1) % vocab
    positions = torch.cat([torch.arange(5, device=device), torch.arange(6, device=device)])[None]

    def packed(first: Tensor, **kwargs):
        ids = torch.cat([first, s2])[None]  # [1, 11]
        return model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).logits

    try:
        with_s1 = packed(s1)[0, 5:]  # [6, V]
        other = packed((s1 + 1) % vocab)[0, 5:]
        alone = model(input_ids=s2[None], use_cache=False).logits[0]  # [6, V]
    except Exception as err:  # any failure means: do not pack this model
        return PackingSupport(False, False, f"a packed forward failed ({type(err).__name__})")
    # float rounding only (an MoE layer's grouped expert matmuls round differently when s1 is
    # routed differently); a sequence that sees another changes by orders of magnitude more
    tol = max(1e3 * torch.finfo(alone.dtype).eps, 1e-4) * max(1.0, float(alone.abs().max()))
    if not torch.allclose(with_s1, other, rtol=0, atol=tol):
        return PackingSupport(False, False, "packed sequences attend to each other")
    if not torch.allclose(with_s1, alone, rtol=0, atol=tol):
        return PackingSupport(False, False, "restarting position ids are not read as packing")
    keep = torch.zeros(1, 11, dtype=torch.bool, device=device)
    keep[0, [4, 7, 10]] = True
    try:
        masked = packed(s1, logits_to_keep=keep)
        logits_mask = masked.shape == (3, alone.shape[-1]) and torch.allclose(
            masked, packed(s1)[keep], rtol=0, atol=tol
        )
    except Exception:  # no 2-D logits_to_keep: compute every position's logits
        logits_mask = False
    return PackingSupport(True, bool(logits_mask))


# ------------------------------------------------------------------ which layout


def _recomputing(model) -> bool:
    """True when this forward's checkpointed layers will recompute in backward (and so keep no
    KV cache: transformers turns ``use_cache`` off inside them)."""
    if not torch.is_grad_enabled():
        return False
    return any(
        getattr(m, "gradient_checkpointing", False) is True and m.training
        for m in _module(model).modules()
    )


def forward_layout(
    model, batch: RolloutBatch, rows: Tensor, *, shared_prefix: bool, packing: bool
) -> str:
    """The layout of ``rows``'s forward that runs the fewest token positions: joint | shared | packed.

    joint: b · (Lp + T); shared (G rows of a group in ``rows``): U · Lp + b · T for U distinct
    groups; packed: n · L for n pack rows of the longest sequence's L tokens. Ties keep the
    joint layout. Packing is only considered for models :func:`packing_support` passes; the
    shared prefix not while layers recompute in backward (gradient checkpointing keeps no cache).
    An FSDP-sharded model always runs joint: every process must make the same forward calls
    (the shared prefix makes two, and the packing probe its own), whatever its rows.
    """
    if is_sharded(model):
        return "joint"
    prompt = batch.prompt_mask[rows].sum(dim=1)  # [b]
    response = batch.response_mask[rows].sum(dim=1)  # [b]
    b = rows.numel()
    Lp, T = max(int(prompt.max()), 1), max(int(response.max()), 1)  # trimmed widths
    costs = {"joint": b * (Lp + T)}
    if shared_prefix and not _recomputing(model):
        groups = torch.unique(rows // batch.group_size).numel()
        if groups < b:
            costs["shared"] = groups * Lp + b * T
    if packing and b > 1 and bool((prompt > 0).all()) and packing_support(model).exact:
        lengths = (prompt + response).tolist()
        costs["packed"] = pack_rows(lengths, max(lengths))[2] * max(lengths)
    return min(costs, key=costs.__getitem__)


def response_logprobs(
    model,
    batch: RolloutBatch,
    rows: Tensor,
    *,
    temperature: float,
    with_entropy: bool = False,
    routing=None,
    shared_prefix: bool = False,
    packing: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) at the sampled tokens for ``rows`` of the batch: [b, T] (+ entropy [b, T]).

    The same left-padded prompt and position ids as generation, so at θ_old these match the
    sampler's log-probs up to float rounding. Columns that are padding in all ``rows`` are
    trimmed first; the result is padded back to the batch's T with zeros. ``routing`` (an MoE
    policy's :class:`seqrl.train.routing.RolloutRouting`) records or replays the forward's routing.
    ``shared_prefix`` allows running each group's prompt once (:func:`shared_prefix_logits`),
    ``packing`` allows the padding-free layout (:func:`pack`); :func:`forward_layout` picks.
    Routing is recorded in the joint layout, so with ``routing`` both are off.
    """
    layout = forward_layout(
        model,
        batch,
        rows,
        shared_prefix=shared_prefix and routing is None,
        packing=packing and routing is None,
    )
    if layout == "packed":
        return _packed_logprobs(model, batch, rows, temperature, with_entropy)
    shared = shared_prefix_logits(model, batch, rows) if layout == "shared" else None
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


def _packed_logprobs(
    model, batch: RolloutBatch, rows: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`response_logprobs` in the packed layout: logits only where a response token is scored."""
    inputs, resp_ids, resp_mask = joint_inputs(batch, rows)  # [b, Lp + T], [b, T]
    real = inputs["attention_mask"].bool()
    keep = scoring_positions(real.shape[1], resp_mask)  # [b, Lp + T] position Lp − 1 + t
    packed = pack(inputs["input_ids"], real, keep)
    logits = packed_outputs(model, packed, logits_mask=packing_support(model).logits_mask)  # [K, V]
    b, T = rows.numel(), batch.response_ids.shape[1]
    mask = torch.nn.functional.pad(resp_mask, (0, T - resp_mask.shape[1]))  # [b, T]
    picked = C.token_logprobs(logits, resp_ids[resp_mask], temperature=temperature)  # [K]
    logprobs = torch.zeros(b, T, dtype=picked.dtype, device=picked.device).masked_scatter(
        mask, picked
    )
    entropy = None
    if with_entropy:
        with torch.no_grad():
            h = C.token_entropy(logits, temperature=temperature)  # [K]
            entropy = torch.zeros_like(logprobs).masked_scatter(mask, h)
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
    packing: bool = False,
    max_tokens: int | None = None,
) -> Tensor:
    """Log-probs of every row under ``model`` (no gradient), in micro-batches: [B, T].

    Micro-batches of ``micro_batch_size`` rows, or of at most ``max_tokens`` tokens
    (:func:`micro_batches`). With ``routing``, the rollout's routing at these parameters
    (θ_old) is recorded.
    """
    B = batch.response_ids.shape[0]
    if routing is not None:
        routing.start(batch)
    micros = micro_batches(
        torch.arange(B), row_tokens(batch), max_rows=micro_batch_size, max_tokens=max_tokens
    )
    padding = Padding(model)  # FSDP: as many forwards as the process with the most micro-batches
    most = padding.most(len(micros))
    parts = [
        response_logprobs(
            model,
            batch,
            rows,
            temperature=temperature,
            routing=routing,
            shared_prefix=shared_prefix,
            packing=packing,
        )[0]
        for rows in micros
    ]
    padding.run(most - len(parts))
    return _in_row_order(parts, micros) if parts else batch.sampler_logprobs.clone()


def _wide(x: Tensor) -> Tensor:
    """float32 or wider (bf16 critics are read out in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _packing_pays(model, real: Tensor) -> bool:
    """Packing ``real`` [b, W] (True = real token) runs fewer positions than b · W, exactly."""
    lengths = real.sum(dim=1).tolist()
    if len(lengths) < 2 or min(lengths) == 0:
        return False
    if pack_rows(lengths, max(lengths))[2] * max(lengths) >= real.numel():
        return False
    return packing_support(model).exact


def prompt_value_logits(
    critic, prompt_ids: Tensor, prompt_mask: Tensor, *, packing: bool = False
) -> Tensor:
    """The critic's output at the last prompt token, from a prompt-only forward: [B].

    prompt_ids, prompt_mask [B, Lp] are left-padded, so column −1 is every row's last real
    token; position ids count real tokens only, so left padding does not move the value, and
    no response token is ever passed in (invariant 16). ``packing``: the prompts are packed
    when that runs fewer positions (:func:`pack`).
    """
    ids, mask = trim(prompt_ids, prompt_mask, left=True)  # [B, Lp']
    if packing and _packing_pays(critic, mask):
        keep = torch.zeros_like(mask)
        keep[:, -1] = True  # [B, Lp'] the last prompt token
        return _wide(packed_outputs(critic, pack(ids, mask, keep))[:, 0])  # [B]
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = critic(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False)
    return _wide(out.logits[:, -1, 0])  # [B]


def token_values(critic, batch: RolloutBatch, rows: Tensor, *, packing: bool = False) -> Tensor:
    """V(s_t) for every response token t of ``rows``: [b, T], 0 on padding.

    s_t = prompt + y_<t, so V(s_t) is read at the position just before token t (the last
    prompt token for t = 0), verl's convention. Same left-padded layout as the policy forward;
    ``packing``: the rows are packed when that runs fewer positions (:func:`pack`).
    """
    inputs, resp_ids, resp_mask = joint_inputs(batch, rows)  # [b, Lp + T]
    T = resp_ids.shape[1]
    real = inputs["attention_mask"].bool()
    if packing and _packing_pays(critic, real):
        keep = scoring_positions(real.shape[1], resp_mask)  # [b, Lp + T]
        values = _wide(packed_outputs(critic, pack(inputs["input_ids"], real, keep))[:, 0])  # [K]
        mask = torch.nn.functional.pad(resp_mask, (0, batch.response_ids.shape[1] - T))
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(
            mask, values
        )  # [b, T]
    Lp = inputs["input_ids"].shape[1] - T
    out = critic(**inputs, use_cache=False)
    values = _wide(out.logits[:, Lp - 1 : Lp - 1 + T, 0])  # [b, T]
    values = torch.where(resp_mask, values, torch.zeros_like(values))
    return torch.nn.functional.pad(values, (0, batch.response_ids.shape[1] - T))


@torch.no_grad()
def batch_values(
    critic,
    batch: RolloutBatch,
    kind: str,
    micro_batch_size: int,
    *,
    packing: bool = False,
    max_tokens: int | None = None,
) -> Tensor:
    """Critic outputs for the whole batch without gradient: logits [B] or values [B, T].

    Micro-batches as :func:`micro_batches` cuts them (the scalar critic counts prompt tokens).
    """
    B = batch.response_ids.shape[0]
    tokens = row_tokens(batch, prompt_only=kind == "scalar")
    micros = micro_batches(
        torch.arange(B), tokens, max_rows=micro_batch_size, max_tokens=max_tokens
    )
    padding = Padding(critic)  # FSDP: as many forwards as the process with the most micro-batches
    most = padding.most(len(micros))
    parts = []
    for rows in micros:
        if kind == "scalar":
            parts.append(
                prompt_value_logits(
                    critic, batch.prompt_ids[rows], batch.prompt_mask[rows], packing=packing
                )
            )
        else:
            parts.append(token_values(critic, batch, rows, packing=packing))
    padding.run(most - len(parts))
    if not parts:  # no rows on this process (kept groups rebalanced over processes)
        shape = batch.response_ids.shape[: 1 if kind == "scalar" else 2]
        return torch.zeros(shape, device=batch.response_ids.device)
    return _in_row_order(parts, micros)
