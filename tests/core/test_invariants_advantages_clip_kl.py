"""Spec §6 invariants 10–14 (group advantages), 25–27 (clipping and aggregation), 31 (KL).

Float64 on CPU. Expected values come from the spec's formulas written out here by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C

DT = torch.float64
EXACT = dict(rtol=1e-13, atol=1e-15)
MAX_TOKENS = 12.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(lengths, T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _batch(seed: int, lengths, T: int, scale: float = 0.3):
    g = _gen(seed)
    B = len(lengths)
    old = -3.0 * torch.rand(B, T, generator=g, dtype=DT) - 0.1
    logp = old + scale * torch.randn(B, T, generator=g, dtype=DT)
    return logp, old, _mask(lengths, T)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------------------------
# Invariant 10: group advantages sum to 0 per group; std 1 with matching ddof


@pytest.mark.parametrize("G", [2, 3, 5, 16])
def test_inv10_group_advantages_sum_to_zero_and_unit_std(G):
    P = 4
    g = _gen(20 + G)
    rewards = torch.cat(
        [
            torch.randn(G, generator=g, dtype=DT),  # continuous rewards
            torch.tensor([1.0] + [0.0] * (G - 1), dtype=DT),  # binary, one success
            (torch.arange(G) % 2).to(DT) * 2 - 1,  # ±1 (DAPO/FIPO)
            torch.rand(G, generator=g, dtype=DT),  # in [0, 1] (GSPO)
        ]
    )
    for eps in (0.0, 1e-6):
        adv = C.group_advantages(rewards, G, eps=eps).view(P, G)
        assert_close(adv.sum(dim=1), torch.zeros(P, dtype=DT), rtol=0, atol=1e-13)
        # std with ddof = 1 (the normaliser's own convention): exactly 1 without eps,
        # σ/(σ + eps) with it
        sigma = rewards.view(P, G).std(dim=1)
        assert_close(adv.std(dim=1), sigma / (sigma + eps), **EXACT)
        if eps == 0.0:
            assert_close(adv.std(dim=1), torch.ones(P, dtype=DT), **EXACT)
    # hand-computed mean/std for one group (no torch.std): (r − r̄) / sqrt(Σ(r − r̄)²/(G − 1))
    r = [float(x) for x in rewards[:G]]
    mean = sum(r) / G
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
    expected = torch.tensor([(x - mean) / (sd + 1e-6) for x in r], dtype=DT)
    assert_close(C.group_advantages(rewards, G)[:G], expected, **EXACT)


# ----------------------------------------------------------------------------------------------
# Invariant 11: RLOO = G/(G−1) · Dr. GRPO


@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_inv11_rloo_is_scaled_dr_grpo_advantage(G):
    g = _gen(30 + G)
    rewards = torch.cat([torch.randn(3 * G, generator=g, dtype=DT), torch.ones(G, dtype=DT)])
    rloo = C.rloo_advantages(rewards, G)
    dr = C.group_centered_advantages(rewards, G)
    assert_close(rloo, G / (G - 1) * dr, **EXACT)
    # and RLOO by its definition: r_i − mean_{j ≠ i} r_j
    grouped = rewards.view(-1, G)
    loo = torch.stack(
        [
            torch.stack(
                [grouped[p, i] - (grouped[p].sum() - grouped[p, i]) / (G - 1) for i in range(G)]
            )
            for p in range(grouped.shape[0])
        ]
    ).reshape(-1)
    assert_close(rloo, loo, **EXACT)
    assert torch.equal(rloo[-G:], torch.zeros(G, dtype=DT))
    assert rloo.abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# Invariant 12: binary rewards, closed form


@pytest.mark.parametrize("G", [2, 4, 5, 8, 16])
def test_inv12_binary_reward_advantage_closed_form(G):
    """Spec: with *population* std, Â = sqrt((1−p)/p) for a success and −sqrt(p/(1−p)) for a
    failure. Our default std is ddof = 1 (verl), so σ_ddof1 = σ_pop·sqrt(G/(G−1)) and
    Â_ours(eps=0) = Â_pop · sqrt((G−1)/G); we test Â_ours · sqrt(G/(G−1)) against the closed form,
    and also the ddof=1 closed form directly."""
    for k in range(1, G):  # k successes, 0 < k < G
        rewards = torch.tensor([1.0] * k + [0.0] * (G - k), dtype=DT)
        p = k / G
        pop = torch.tensor(
            [math.sqrt((1 - p) / p)] * k + [-math.sqrt(p / (1 - p))] * (G - k), dtype=DT
        )
        adv = C.group_advantages(rewards, G, eps=0.0)
        assert_close(adv * math.sqrt(G / (G - 1)), pop, **EXACT)
        assert_close(adv, pop * math.sqrt((G - 1) / G), **EXACT)


# ----------------------------------------------------------------------------------------------
# Invariant 13: a group of one sample has advantage 0 (r − mean = 0; its std is undefined)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_inv13_group_size_one_gives_zero_advantage(scale):
    """The equation, not verl's mean-0/std-1 convention (Â = r): every group, G = 1 included,
    sums to 0, and a run with G = 1 would learn nothing (the config refuses it)."""
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.37, 2.5], dtype=DT)
    for eps in (0.0, 1e-6):
        adv = C.group_advantages(rewards, 1, scale=scale, eps=eps)
        assert adv.dtype == DT and torch.equal(adv, torch.zeros_like(rewards))
    assert torch.equal(C.group_centered_advantages(rewards, 1), torch.zeros_like(rewards))
    rewards2 = rewards.clone()
    adv[0] = 99.0  # the result is not a view of the input
    assert torch.equal(rewards, rewards2)


# ----------------------------------------------------------------------------------------------
# Invariant 14: the same advantage on every valid token, zero on padding


def test_inv14_advantage_broadcast_constant_on_valid_tokens_zero_on_padding():
    lengths = [5, 1, 0, 3]
    mask = _mask(lengths, 5)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=DT)
    for adv in (
        C.group_advantages(rewards, 2),
        C.group_centered_advantages(rewards, 2),
        C.rloo_advantages(rewards, 2),
        C.remax_advantages(rewards, torch.tensor([0.0, 1.0, 0.0, 0.5], dtype=DT)),
        C.sppo_advantages(rewards, torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=DT)),
    ):
        tok = C.broadcast_to_tokens(adv, mask)
        for i, n in enumerate(lengths):
            assert torch.equal(tok[i, :n], adv[i].expand(n))
            assert torch.equal(tok[i, n:], torch.zeros(5 - n, dtype=DT))

    # ReMax's token form with a terminal-only reward is constant on the valid tokens too
    scores = torch.tensor([1.0, 0.0, 0.5, -1.0], dtype=DT)
    greedy = torch.tensor([0.25, 0.5, 0.0, 0.0], dtype=DT)
    token_r = C.token_level_rewards(scores, mask)
    remax = C.remax_advantages(token_r, greedy, mask)
    assert torch.equal(remax, C.broadcast_to_tokens(scores - greedy, mask))

    # policy_loss: [B] advantages == their broadcast, and [B, T] padding values are ignored
    logp, old, _ = _batch(40, lengths, 5, scale=0.3)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=DT)
    tok = C.broadcast_to_tokens(adv, mask)
    junk = torch.where(mask, tok, torch.full_like(tok, 1e6))
    for name in ("ppo", "dapo", "fipo", "gspo_token", "sppo"):
        outs = [
            C.policy_loss(name, logprobs=logp, old_logprobs=old, advantages=a, mask=mask).loss
            for a in (adv, tok, junk)
        ]
        assert_close(outs[1], outs[0], rtol=0, atol=0)
        assert_close(outs[2], outs[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Invariant 25: clip-higher gradient masks, dual clip


EPS_LOW, EPS_HIGH, DUAL_C = 0.2, 0.28, 10.0
# ratios avoiding the exact boundaries 0.8, 1.28 and 10
_W = [0.3, 0.79, 0.81, 0.95, 1.0, 1.1, 1.27, 1.29, 2.0, 9.9, 10.1, 40.0]


@pytest.mark.parametrize("dual", [None, DUAL_C])
def test_inv25_clip_higher_gradient_mask_and_dual_clip_value(dual):
    w = torch.tensor(_W, dtype=DT)
    n = len(_W)
    for a in (1.7, -0.6):
        ratio = w.clone()[None].requires_grad_(True)  # [1, n]
        adv = torch.full((1, n), a, dtype=DT)
        loss = C.clipped_surrogate(
            ratio, adv, clip_low=EPS_LOW, clip_high=EPS_HIGH, dual_clip_c=dual
        )
        g = _grad(loss.sum(), ratio)[0]
        if a > 0:
            zero = [x > 1 + EPS_HIGH for x in _W]
        else:
            zero = [x < 1 - EPS_LOW or (dual is not None and x > dual) for x in _W]
        assert [bool(v == 0) for v in g] == zero, (a, g)
        # non-zero gradient is the unclipped −A (d/dw of −A·w)
        assert_close(g[~torch.tensor(zero)], torch.full((n - sum(zero),), -a, dtype=DT), **EXACT)

        masks = C.clip_masks(
            w[None], adv, torch.ones(1, n, dtype=torch.bool),
            clip_low=EPS_LOW, clip_high=EPS_HIGH, dual_clip_c=dual,
        )  # fmt: skip
        union = (masks["high"] | masks["low"] | masks["dual"])[0]
        assert union.tolist() == zero
        if a < 0 and dual is not None:
            hit = w > dual
            assert masks["dual"][0].tolist() == hit.tolist()
            # dual-clipped loss equals −A·c exactly
            assert torch.equal(loss[0][hit], torch.full((int(hit.sum()),), -a * dual, dtype=DT))
        expected = []  # the spec §0.2 formula element by element
        for x in _W:
            lc = max(-a * x, -a * min(max(x, 1 - EPS_LOW), 1 + EPS_HIGH))
            expected.append(min(lc, -a * dual) if (a < 0 and dual is not None) else lc)
        assert_close(loss[0], torch.tensor(expected, dtype=DT), **EXACT)


def test_inv25_policy_loss_gradient_mask_matches_clip_metrics():
    """Through policy_loss('dapo'): per-token gradient w.r.t. logp is zero exactly where the
    clip masks say so, and the reported fractions are those masks' means."""
    n = len(_W)
    w = torch.tensor(_W + _W, dtype=DT).view(2, n)
    adv = torch.tensor([[1.3] * n, [-0.9] * n], dtype=DT)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, -1] = False  # one padded token
    old = torch.full((2, n), -2.0, dtype=DT)
    logp = (old + torch.log(w)).requires_grad_(True)
    out = C.policy_loss("dapo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)
    g = _grad(out.loss, logp)
    high = mask & (adv > 0) & (w > 1 + EPS_HIGH)
    low = mask & (adv < 0) & (w < 1 - EPS_LOW)
    dual = mask & (adv < 0) & (w > DUAL_C)
    zero = high | low | dual | ~mask
    assert torch.equal(g == 0, zero)
    nv = mask.sum().item()
    m = out.metrics
    assert_close(m["policy/clip_frac_high"], torch.tensor(high.sum().item() / nv, dtype=DT))
    assert_close(m["policy/clip_frac_low"], torch.tensor(low.sum().item() / nv, dtype=DT))
    assert_close(m["policy/dual_clip_frac"], torch.tensor(dual.sum().item() / nv, dtype=DT))
    assert_close(m["policy/clip_frac"], torch.tensor((high | low).sum().item() / nv, dtype=DT))
    assert high.any() and low.any() and dual.any()


# ----------------------------------------------------------------------------------------------
# Invariant 26: token-mean == seq-mean-token-mean at equal lengths; Dr. GRPO scaling


def test_inv26_token_mean_equals_seq_mean_token_mean_for_equal_lengths():
    logp, old, _ = _batch(50, [5] * 4, 7, scale=0.3)
    mask = _mask([5] * 4, 7)
    vals = torch.randn(4, 7, generator=_gen(51), dtype=DT)
    assert_close(
        C.aggregate(vals, mask, "token-mean"), C.aggregate(vals, mask, "seq-mean-token-mean"),
        **EXACT,
    )  # fmt: skip
    adv = torch.tensor([1.0, -0.5, 0.3, -1.1], dtype=DT)
    for name in ("ppo", "dapo", "grpo", "gspo", "fipo"):
        lp = logp.clone().requires_grad_(True)
        kw = {"kl_coef": 0.0} if name == "grpo" else {}
        a = C.policy_loss(name, logprobs=lp, old_logprobs=old, advantages=adv, mask=mask,
                          agg="token-mean", **kw).loss  # fmt: skip
        b = C.policy_loss(name, logprobs=lp, old_logprobs=old, advantages=adv, mask=mask,
                          agg="seq-mean-token-mean", **kw).loss  # fmt: skip
        assert_close(a, b, **EXACT)
        assert_close(_grad(a, lp), _grad(b, lp), **EXACT)
    # unequal lengths: they differ (the check above is not vacuous)
    ragged = _mask([7, 2, 5, 1], 7)
    assert not torch.allclose(
        C.aggregate(vals, ragged, "token-mean"), C.aggregate(vals, ragged, "seq-mean-token-mean")
    )


def test_inv26_dr_grpo_scales_as_one_over_max_tokens():
    lengths = [6, 2, 4, 1, 5]
    logp, old, mask = _batch(52, lengths, 6, scale=0.3)
    adv = C.group_centered_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5], dtype=DT), 3)[:5]
    losses, grads = {}, {}
    for M in (1.0, 7.0, 3000.0):
        lp = logp.clone().requires_grad_(True)
        out = C.policy_loss(
            "dr_grpo", logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, max_tokens=M
        )
        losses[M], grads[M] = out.loss, _grad(out.loss, lp)
    lp = logp.clone().requires_grad_(True)
    plain = C.policy_loss(
        "dr_grpo", logprobs=lp, old_logprobs=old, advantages=adv, mask=mask,
        agg="seq-mean-token-sum",
    )  # fmt: skip
    g_plain = _grad(plain.loss, lp)
    for M in losses:
        assert_close(losses[M] * M, losses[1.0], **EXACT)
        assert_close(grads[M] * M, grads[1.0], **EXACT)
        assert_close(losses[M], plain.loss / M, **EXACT)
        assert_close(grads[M], g_plain / M, **EXACT)
    # seq-mean-token-sum by hand: (1/B) Σ_i Σ_t ℓ_{i,t}
    per_tok = C.clipped_surrogate(
        torch.exp(logp - old), C.broadcast_to_tokens(adv, mask), clip_low=0.2, clip_high=0.2
    )
    by_hand = sum(float(per_tok[i, :n].sum()) for i, n in enumerate(lengths)) / len(lengths)
    assert math.isclose(plain.loss.item(), by_hand, rel_tol=1e-13)
    # never the padded width: padding the batch wider does not change the loss
    wide = C.policy_loss(
        "dr_grpo", logprobs=torch.cat([logp, torch.zeros(5, 9, dtype=DT)], 1),
        old_logprobs=torch.cat([old, torch.zeros(5, 9, dtype=DT)], 1), advantages=adv,
        mask=torch.cat([mask, torch.zeros(5, 9, dtype=torch.bool)], 1), max_tokens=7.0,
    )  # fmt: skip
    assert_close(wide.loss, losses[7.0], **EXACT)


# ----------------------------------------------------------------------------------------------
# Invariant 27: micro-batch invariance with global normalisers

_MB_LENGTHS = [6, 2, 0, 5, 1, 4, 3]  # a fully padded row inside a micro-batch
_SPLITS = [(0, 2), (2, 3), (3, 7)]
_MB_NAMES = ("ppo", "grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "sppo", "fipo")


def _mb_call(name, mode, logp, old, adv, mask, ref, **norm):
    kw = {"agg": mode}
    if mode == "seq-mean-token-sum-norm":
        kw["max_tokens"] = MAX_TOKENS
    return C.policy_loss(
        name, logprobs=logp, old_logprobs=old, advantages=adv, mask=mask,
        ref_logprobs=ref if name == "grpo" else None, **kw, **norm,
    ).loss  # fmt: skip


def _norm_kwargs(mode, mask):
    total_tokens, total_sequences = C.normalizers(mask)
    if mode == "token-mean":
        return {"total_tokens": total_tokens}
    return {"total_sequences": total_sequences}


@pytest.mark.parametrize("mode", C.AGG_MODES)
@pytest.mark.parametrize("name", _MB_NAMES)
def test_inv27_micro_batch_gradient_equals_mini_batch_gradient(name, mode):
    logp, old, mask = _batch(60, _MB_LENGTHS, 6, scale=0.4)  # ratios in the clipping regime
    ref = old + 0.2 * torch.randn(old.shape, generator=_gen(61), dtype=DT)
    B = len(_MB_LENGTHS)
    adv = torch.randn(B, generator=_gen(62), dtype=DT)
    if name not in ("gspo",):
        adv = adv[:, None] + 0.3 * torch.randn(B, 6, generator=_gen(63), dtype=DT)
    full_lp = logp.clone().requires_grad_(True)
    full = _mb_call(name, mode, full_lp, old, adv, mask, ref)
    g_full = _grad(full, full_lp)

    norm = _norm_kwargs(mode, mask)
    micro_lp = logp.clone().requires_grad_(True)
    total = 0.0
    for a, b in _SPLITS:
        total = total + _mb_call(
            name, mode, micro_lp[a:b], old[a:b], adv[a:b], mask[a:b], ref[a:b], **norm
        )
    g_micro = _grad(total, micro_lp)
    assert g_full.abs().max() > 1e-3
    assert_close(total, full, **EXACT)
    assert_close(g_micro, g_full, **EXACT)


def test_inv27_micro_batch_without_global_normalisers_is_not_invariant():
    """Negative control: averaging micro-batch losses that use local normalisers changes the
    weighting, which is why total_tokens / total_sequences exist."""
    logp, old, mask = _batch(64, _MB_LENGTHS, 6, scale=0.4)
    adv = torch.randn(len(_MB_LENGTHS), generator=_gen(65), dtype=DT)
    for name in ("dapo", "grpo"):
        kw = {"kl_coef": 0.0} if name == "grpo" else {}

        def call(sl, name=name, kw=kw):
            return C.policy_loss(
                name, logprobs=logp[sl], old_logprobs=old[sl], advantages=adv[sl],
                mask=mask[sl], **kw,
            ).loss  # fmt: skip

        full = call(slice(None))
        naive = sum(call(slice(a, b)) for a, b in _SPLITS) / len(_SPLITS)
        assert not torch.allclose(naive, full, rtol=1e-3, atol=0), name


def _fipo_drop_batch():
    """A FIPO batch where row 1 is dropped (two tokens with Â < 0 and w > c = 10)."""
    logp, old, mask = _batch(66, _MB_LENGTHS, 6, scale=0.2)
    logp = logp.clone()
    logp[1, 0] = old[1, 0] + math.log(12.0)
    logp[1, 1] = old[1, 1] + math.log(15.0)
    adv = torch.randn(len(_MB_LENGTHS), generator=_gen(67), dtype=DT)
    adv[1] = -1.0
    return logp, old, adv, mask


def test_inv27_fipo_micro_batch_with_dropped_sequence_needs_kept_token_count():
    logp, old, adv, mask = _fipo_drop_batch()
    full_lp = logp.clone().requires_grad_(True)
    full = C.policy_loss("fipo", logprobs=full_lp, old_logprobs=old, advantages=adv, mask=mask)
    assert full.metrics["fipo/dropped_seqs"].item() == 1.0
    g_full = _grad(full.loss, full_lp)
    # the drop rule removes the row from the denominator too, so the global token count must be
    # that of the kept rows: dual_clip_drop_mask tells which rows FIPO drops
    keep = C.dual_clip_drop_mask(
        C.broadcast_to_tokens(adv, mask), C.token_log_ratio(logp, old, mask), mask, 10.0
    )
    total_tokens, _ = C.normalizers(mask & keep[:, None])
    micro_lp = logp.clone().requires_grad_(True)
    total = sum(
        C.policy_loss(
            "fipo", logprobs=micro_lp[a:b], old_logprobs=old[a:b], advantages=adv[a:b],
            mask=mask[a:b], total_tokens=total_tokens,
        ).loss
        for a, b in _SPLITS
    )  # fmt: skip
    assert_close(total, full.loss, **EXACT)
    assert_close(_grad(total, micro_lp), g_full, **EXACT)


def test_inv27_fipo_micro_batch_with_dropped_sequence_documented_recipe():
    """policy_loss's documented recipe for FIPO's drop rule: total_tokens=1 (a plain token sum)
    per micro-batch, accumulate, then divide by Σ fipo/kept_tokens. Exact."""
    logp, old, adv, mask = _fipo_drop_batch()
    full_lp = logp.clone().requires_grad_(True)
    full = C.policy_loss("fipo", logprobs=full_lp, old_logprobs=old, advantages=adv, mask=mask)
    g_full = _grad(full.loss, full_lp)
    micro_lp = logp.clone().requires_grad_(True)
    total, kept = 0.0, 0.0
    for a, b in _SPLITS:
        out = C.policy_loss(
            "fipo", logprobs=micro_lp[a:b], old_logprobs=old[a:b], advantages=adv[a:b],
            mask=mask[a:b], total_tokens=1,
        )  # fmt: skip
        total = total + out.loss
        kept = kept + out.metrics["fipo/kept_tokens"]
    assert kept.item() == full.metrics["fipo/kept_tokens"].item() == mask.sum().item() - 2
    g_micro = _grad(total, micro_lp) / kept
    assert_close(total / kept, full.loss, **EXACT)
    assert_close(g_micro, g_full, **EXACT)

    # negative control: normalizers(full_mask) still counts the dropped row's 2 tokens
    total_tokens, _ = C.normalizers(mask)
    naive = sum(
        C.policy_loss(
            "fipo", logprobs=logp[a:b], old_logprobs=old[a:b], advantages=adv[a:b],
            mask=mask[a:b], total_tokens=total_tokens,
        ).loss
        for a, b in _SPLITS
    )  # fmt: skip
    assert not torch.allclose(naive, full.loss, rtol=1e-6, atol=0)
    assert_close(naive * total_tokens, full.loss * (total_tokens - 2), **EXACT)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_inv27_fipo_deferred_normaliser_is_exact_for_any_split(mode):
    """defer_normalizer=True: each micro-batch returns its undivided sum and kept count; the
    sum of sums over the sum of counts is the minibatch loss, for tokens and sequences alike."""
    logp, old, adv, mask = _fipo_drop_batch()
    cfg = C.resolve_policy_loss_config("fipo", agg=mode)
    full_lp = logp.clone().requires_grad_(True)
    full = C.clipped_policy_loss(cfg, logprobs=full_lp, old_logprobs=old, advantages=adv, mask=mask)
    assert full.denominator is None and full.metrics["fipo/dropped_seqs"].item() == 1.0
    g_full = _grad(full.loss, full_lp)
    micro_lp = logp.clone().requires_grad_(True)
    total, denominator = 0.0, 0.0
    for a, b in _SPLITS:
        out = C.clipped_policy_loss(
            cfg, logprobs=micro_lp[a:b], old_logprobs=old[a:b], advantages=adv[a:b],
            mask=mask[a:b], total_tokens=999.0, total_sequences=999.0, defer_normalizer=True,
        )  # fmt: skip
        total, denominator = total + out.loss, denominator + out.denominator
    kept_rows = 5  # 7 rows, one all padding, one dropped
    assert denominator.item() == (mask.sum().item() - 2 if mode == "token-mean" else kept_rows)
    assert_close(total / denominator, full.loss, **EXACT)
    assert_close(_grad(total, micro_lp) / denominator, g_full, **EXACT)
    # a loss without the drop rule ignores the flag: the given normaliser, nothing deferred
    plain = C.policy_loss(
        "dapo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, total_tokens=3.0
    )
    deferred = C.clipped_policy_loss(
        C.resolve_policy_loss_config("dapo"), logprobs=logp, old_logprobs=old, advantages=adv,
        mask=mask, total_tokens=3.0, defer_normalizer=True,
    )  # fmt: skip
    assert deferred.denominator is None and torch.equal(deferred.loss, plain.loss)


# ----------------------------------------------------------------------------------------------
# Invariant 31: KL estimators


def test_inv31_kl_estimators_zero_on_policy_and_k3_nonnegative():
    logp, _, mask = _batch(70, [5, 3, 0, 4], 5)
    for est in C.KL_ESTIMATORS:
        k = C.kl_estimate(logp, logp.clone(), mask, est)
        assert torch.equal(k, torch.zeros_like(k)), est
    # k3 ≥ 0 for any ρ, including large |ρ| and values near 0
    rho = torch.cat(
        [
            torch.linspace(-30.0, 30.0, 2001, dtype=DT),
            torch.tensor([1e-12, -1e-12, 1e-8, -1e-8, 1e-300], dtype=DT),
            torch.randn(5000, generator=_gen(71), dtype=DT) * 5,
        ]
    )[None]
    ref = torch.full_like(rho, -2.0)
    full = torch.ones_like(rho, dtype=torch.bool)
    k3 = C.kl_estimate(ref + rho, ref, full, "k3")
    assert (k3 >= 0).all()
    assert_close(k3, torch.exp(-rho) + rho - 1.0, rtol=1e-12, atol=1e-15)
    assert_close(C.kl_estimate(ref + rho, ref, full, "k1"), rho, rtol=0, atol=1e-12)
    assert_close(C.kl_estimate(ref + rho, ref, full, "k2"), 0.5 * rho**2, rtol=1e-12, atol=1e-12)
    # padding: 0 whatever the values
    pad = torch.zeros(1, 3, dtype=torch.bool)
    junk = torch.tensor([[-math.inf, 1e4, 0.0]], dtype=DT)
    for est in C.KL_ESTIMATORS:
        assert torch.equal(C.kl_estimate(junk, -junk, pad, est), torch.zeros(1, 3, dtype=DT))


def test_inv31_kl_estimators_are_unbiased_on_a_small_categorical():
    """E_{y∼π_θ}[k1] = E[k3] = KL(π_θ‖π_ref). Checked exactly (sum over the support) and by
    Monte Carlo with a fixed seed and a 3-sigma tolerance."""
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=DT)
    ref = torch.tensor([0.2, 0.3, 0.1, 0.25, 0.15], dtype=DT)
    kl = float((pi * (pi.log() - ref.log())).sum())
    V = len(pi)
    support = torch.ones(1, V, dtype=torch.bool)
    for est in ("k1", "k3"):
        per_y = C.kl_estimate(pi.log()[None], ref.log()[None], support, est)[0]
        assert math.isclose(float((pi * per_y).sum()), kl, rel_tol=1e-13)

    n = 200_000
    y = torch.multinomial(pi, n, replacement=True, generator=_gen(72)).view(1, n)
    logp = pi.log()[y]
    logr = ref.log()[y]
    m = torch.ones(1, n, dtype=torch.bool)
    for est in ("k1", "k3"):
        k = C.kl_estimate(logp, logr, m, est)[0]
        se = float(k.std()) / math.sqrt(n)
        assert abs(float(k.mean()) - kl) < 3 * se, (est, float(k.mean()), kl, se)
    # k3 is the lower-variance estimator here (the reason GRPO uses it)
    k1 = C.kl_estimate(logp, logr, m, "k1")[0]
    k3 = C.kl_estimate(logp, logr, m, "k3")[0]
    assert k3.var() < k1.var()
    # k2 is biased (E[k2] ≠ KL in general): guards against swapping the estimators
    k2 = C.kl_estimate(pi.log()[None], ref.log()[None], support, "k2")[0]
    assert abs(float((pi * k2).sum()) - kl) > 0.01


def test_reward_kl_penalty_is_beta_k_of_old_against_ref_and_sums_to_the_token_rewards():
    """p_t = β·k(log π_old − log π_ref), 0 on padding, detached; R − Σ_t p_t is the sum of
    token_level_rewards' per-token rewards (the score at the last valid token)."""
    old, ref, mask = _batch(11, [5, 2, 4], 6)
    scores = torch.tensor([1.0, 0.0, -1.0], dtype=DT)
    for est in ("k1", "k2", "k3"):
        p = C.reward_kl_penalty(old.requires_grad_(), ref, mask, kl_coef=0.01, kl_estimator=est)
        assert not p.requires_grad and bool((p[~mask] == 0).all())
        assert_close(p, 0.01 * C.kl_estimate(old.detach(), ref, mask, est), **EXACT)
        tok = C.token_level_rewards(
            scores, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=0.01, kl_estimator=est
        )
        assert_close(scores - p.sum(-1), tok.sum(-1), **EXACT)
    k1 = C.reward_kl_penalty(old, ref, mask, kl_coef=0.5)
    assert_close(k1, torch.where(mask, 0.5 * (old - ref), 0.0).detach(), **EXACT)
    assert torch.equal(C.reward_kl_penalty(old, old, mask, kl_coef=0.5), torch.zeros_like(old))
    with pytest.raises(ValueError, match="kl_coef"):
        C.reward_kl_penalty(old, ref, mask, kl_coef=-1.0)
