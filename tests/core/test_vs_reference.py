"""Fast ``seqrl.core`` vs the slow loop references in ``tests/reference.py``.

Random float64 inputs with ragged masks (length-1 rows, full rows, an all-padding row, interior
holes), values and gradients. Data regimes are built so that clipping, dual clip, the log-ratio
clamp and every FIPO rule actually fire; each such test asserts that they did, so none can pass
vacuously.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import reference as R
import seqrl.core as C

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
FKL_TOL = dict(rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# data helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def ragged_mask(B, T, g, *, holes=False, lengths=None):
    """Right-padded ragged mask: row 0 full, row 1 length 1, row 2 empty, the rest random.

    With ``holes`` some interior positions of the valid prefix are switched off as well
    (non-contiguous masks, e.g. tool output inside a multi-turn response)."""
    if lengths is None:
        special = [T, 1, 0]
        rest = (
            torch.randint(2, T + 1, (max(B - 3, 0),), generator=g).tolist()
            if T >= 2
            else [T] * max(B - 3, 0)
        )
        lengths = (special + rest)[:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    if holes:
        hole = torch.rand(B, T, generator=g) < 0.2
        hole[:, 0] = False
        for i, n in enumerate(lengths):
            if n >= 1:
                hole[i, n - 1] = False  # keep the end of each response
        mask &= ~hole
    return mask


def _sign_pattern(B):
    base = [-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0]
    return torch.tensor([base[i % len(base)] for i in range(B)], dtype=DT)


def policy_batch(seed, regime, adv_dim, B=8, T=12):
    """(logp, old, adv, mask, ref) with garbage in the padding.

    regimes: spiky (σ=0.3 + planted ratio spikes incl. one beyond the ±20 clamp), moderate (σ=0.12 +
    spikes), near (|δ| ~ 1e-4: straddles GSPO's [1−3e-4, 1+4e-4]), gentle (σ=0.05, no spikes: FIPO
    weights strictly inside their range), onpolicy (δ ≡ 0), holes (spiky, non-contiguous mask)."""
    g = _gen(seed)
    mask = ragged_mask(B, T, g, holes=(regime == "holes"))
    old = -(_randn(g, B, T).abs() * 2.0) - 0.05
    if regime in ("spiky", "holes"):
        delta = 0.3 * _randn(g, B, T)
    elif regime == "moderate":
        delta = 0.12 * _randn(g, B, T)
    elif regime == "near":
        offsets = torch.tensor([-1e-3, 2e-4, -2e-4, 6e-4, 1e-4, -5e-4, 0.0, 1.5e-4], dtype=DT)
        delta = offsets[torch.arange(B) % 8][:, None] + 1e-4 * _randn(g, B, T)
    elif regime == "gentle":
        delta = 0.05 * _randn(g, B, T)
    elif regime == "onpolicy":
        delta = torch.zeros(B, T, dtype=DT)
    else:
        raise ValueError(regime)
    if regime in ("spiky", "moderate", "holes"):
        # plant spikes on valid tokens: row kinds cycle through 2x(+3), 1x(+3), +1.5, +25/+4.
        for i in range(B):
            idx = mask[i].nonzero().flatten().tolist()
            if len(idx) < 2:
                continue
            kind = i % 4
            if kind == 0:
                delta[i, idx[0]] += 3.0
                delta[i, idx[-1]] += 3.0
            elif kind == 1:
                delta[i, idx[len(idx) // 2]] += 3.0
            elif kind == 2:
                delta[i, idx[0]] += 1.5
                delta[i, idx[-1]] -= 2.0
            else:
                delta[i, idx[-1]] += 25.0 if regime != "moderate" else 4.0
    logp = old + delta
    # garbage in padding (must never leak)
    logp = torch.where(mask, logp, _randn(g, B, T) * 5.0)
    old = torch.where(mask, old, _randn(g, B, T) * 5.0)
    sign = _sign_pattern(B)
    if adv_dim == 1:
        adv = sign * (_randn(g, B).abs() + 0.1)
    else:
        flip = torch.where(torch.rand(B, T, generator=g) < 0.2, -1.0, 1.0).to(DT)
        adv = sign[:, None] * flip * (_randn(g, B, T).abs() + 0.05)
        adv = torch.where(mask, adv, _randn(g, B, T))  # garbage in padding
    ref = old + 0.2 * _randn(g, B, T)
    return logp, old, adv, mask, ref


def grad_of(loss, x):
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _preset_kwargs(name, max_tokens=20):
    return {"max_tokens": max_tokens} if name == "dr_grpo" else {}


def run_both(name, logp, old, adv, mask, ref=None, **kw):
    """Returns ((fast_loss, fast_grad), (ref_loss, ref_grad), fast LossOutput)."""
    lf = logp.clone().requires_grad_(True)
    lr = logp.clone().requires_grad_(True)
    out = C.policy_loss(
        name, logprobs=lf, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, **kw
    )
    ref_loss = R.ref_policy_loss(name, lr, old, adv, mask, ref_logprobs=ref, **kw)
    return (out.loss, grad_of(out.loss, lf)), (ref_loss, grad_of(ref_loss, lr)), out


def _cfg(name, **overrides):
    cfg = dict(R.POLICY_LOSS_PRESETS[name])
    cfg.update(overrides)
    return cfg


def trigger_counts(name, logp, old, adv, mask, **overrides):
    """Counts (from the reference side) of tokens where each clipping rule binds."""
    cfg = _cfg(name, **overrides)
    B, T = mask.shape
    clamp = cfg["log_ratio_clamp"]
    A = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
    ls = R.ref_sequence_log_ratio(logp, old, mask)
    counts = dict(hi=0, lo=0, dual=0, clamp=0, inside=0)
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            d = float(logp[i, t] - old[i, t])
            if cfg["ratio_level"] == "token":
                lw = d
            else:
                lw = float(ls[i])
            if clamp is not None and abs(lw) > clamp:
                counts["clamp"] += 1
                lw = max(-clamp, min(clamp, lw))
            w = math.exp(lw)
            a = float(A[i, t])
            if a > 0 and w > 1 + cfg["clip_high"]:
                counts["hi"] += 1
            elif a < 0 and w < 1 - cfg["clip_low"]:
                counts["lo"] += 1
            elif cfg["dual_clip_c"] is not None and a < 0 and w > cfg["dual_clip_c"]:
                counts["dual"] += 1
            else:
                counts["inside"] += 1
    return counts


def fipo_triggers(logp, old, adv, mask, cfg):
    """Counts of FIPO rules that bind (reference side)."""
    B, T = mask.shape
    clamp = cfg.get("log_ratio_clamp", 20.0)
    c = cfg.get("dual_clip_c", 10.0)
    dl = R.ref_token_log_ratio(logp, old, mask, clamp=clamp).detach()
    F = R.ref_future_kl_scan(dl, mask, cfg.get("decay_rate", 32.0), c)
    fmin, fmax = cfg.get("influence_min", 1.0), cfg.get("influence_max", 1.2)
    safety = cfg.get("safety_threshold", 10.0)
    keep = R.ref_drop_mask(adv, dl, mask, c)
    A = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
    out = dict(filtered=0, at_max=0, at_min=0, interior=0, safety=0, dropped=int((~keep).sum()))
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            if c is not None and math.exp(float(dl[i, t])) > c:
                out["filtered"] += 1
            e = math.exp(float(F[i, t]))
            if safety is not None and float(A[i, t]) < 0 and math.exp(float(dl[i, t])) > safety:
                out["safety"] += 1
            elif fmax is not None and e > fmax:
                out["at_max"] += 1
            elif fmin is not None and e < fmin:
                out["at_min"] += 1
            else:
                out["interior"] += 1
    return out


# ----------------------------------------------------------------------------------------------
# masks and aggregation


@pytest.mark.parametrize("holes", [False, True])
def test_mask_helpers(holes):
    g = _gen(11)
    mask = ragged_mask(6, 9, g, holes=holes)
    x = _randn(g, 6, 9)
    torch.testing.assert_close(C.masked_sum(x, mask), R.ref_masked_sum(x, mask), **TOL)
    torch.testing.assert_close(C.masked_mean(x, mask), R.ref_masked_mean(x, mask), **TOL)
    torch.testing.assert_close(C.masked_var(x, mask), R.ref_masked_var(x, mask), **TOL)
    torch.testing.assert_close(
        C.masked_var(x, mask, unbiased=False), R.ref_masked_var(x, mask, unbiased=False), **TOL
    )
    torch.testing.assert_close(C.masked_whiten(x, mask), R.ref_whiten(x, mask), **TOL)
    torch.testing.assert_close(
        C.masked_whiten(x, mask, eps=0.5), R.ref_whiten(x, mask, eps=0.5), **TOL
    )
    assert torch.equal(C.sequence_lengths(mask), R.ref_sequence_lengths(mask))
    # per-row sums / means on rows that are non-empty
    full = mask[[0, 1, 3, 4, 5]]
    xf = x[[0, 1, 3, 4, 5]]
    torch.testing.assert_close(
        C.masked_sum(xf, full, dim=-1),
        torch.stack([R.ref_masked_sum(xf[i : i + 1], full[i : i + 1]) for i in range(5)]),
        **TOL,
    )
    torch.testing.assert_close(
        C.masked_mean(xf, full, dim=-1),
        torch.stack([R.ref_masked_mean(xf[i : i + 1], full[i : i + 1]) for i in range(5)]),
        **TOL,
    )


def test_broadcast_to_tokens():
    g = _gen(12)
    mask = ragged_mask(7, 5, g, holes=True)
    x = _randn(g, 7)
    torch.testing.assert_close(
        C.broadcast_to_tokens(x, mask), R.ref_broadcast_to_tokens(x, mask), **TOL
    )


@pytest.mark.parametrize("mode", R.AGG_MODES)
@pytest.mark.parametrize("case", ["ragged", "holes", "empty", "single", "totals"])
def test_aggregate(mode, case):
    g = _gen(13)
    B, T = 6, 10
    mask = ragged_mask(B, T, g, holes=(case == "holes"))
    if case == "empty":
        mask = torch.zeros(B, T, dtype=torch.bool)
    if case == "single":
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[3, 4] = True
    v = _randn(g, B, T).requires_grad_(True)
    kw = {"max_tokens": 17} if mode == "seq-mean-token-sum-norm" else {}
    if case == "totals":  # global normalisers (only the one that applies to the mode)
        kw.update(total_tokens=93) if mode == "token-mean" else kw.update(total_sequences=11)
    fast = C.aggregate(v, mask, mode, **kw)
    ref = R.ref_aggregate(v, mask, mode, **kw)
    assert fast.dim() == 0
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(grad_of(fast, v), grad_of(ref, v), **TOL)
    if case == "empty":
        assert float(fast.detach()) == 0.0


def test_aggregate_norm_requires_max_tokens():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError):
        C.aggregate(torch.ones(2, 3, dtype=DT), mask, "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------------------------
# ratios, clipped surrogate, KL


@pytest.mark.parametrize("clamp", [None, 20.0, 0.5])
def test_token_log_ratio(clamp):
    g = _gen(21)
    mask = ragged_mask(6, 11, g, holes=True)
    old = _randn(g, 6, 11)
    logp = (old + _randn(g, 6, 11)).requires_grad_(True)
    fast = C.token_log_ratio(logp, old, mask, clamp=clamp)
    ref = R.ref_token_log_ratio(logp, old, mask, clamp=clamp)
    torch.testing.assert_close(fast, ref, **TOL)
    wts = _randn(g, 6, 11)
    torch.testing.assert_close(
        grad_of((fast * wts).sum(), logp), grad_of((ref * wts).sum(), logp), **TOL
    )
    if clamp == 0.5:  # clamp actually binds
        assert ((logp - old).abs()[mask] > 0.5).any() and ((logp - old).abs()[mask] < 0.5).any()


def test_sequence_and_gspo_token_log_ratio():
    g = _gen(22)
    mask = ragged_mask(7, 13, g, holes=True)
    old = _randn(g, 7, 13)
    logp = (old + _randn(g, 7, 13)).requires_grad_(True)
    wts = _randn(g, 7)
    fast = C.sequence_log_ratio(logp, old, mask)
    ref = R.ref_sequence_log_ratio(logp, old, mask)
    torch.testing.assert_close(fast, ref, **TOL)
    assert float(fast[2].detach()) == 0.0  # empty row
    torch.testing.assert_close(
        grad_of((fast * wts).sum(), logp), grad_of((ref * wts).sum(), logp), **TOL
    )
    # GSPO-token: value == sequence log ratio on every valid token, gradient == identity on valid tokens
    wt = _randn(g, 7, 13)
    fast_t = C.gspo_token_log_ratio(logp, old, mask)
    ref_t = R.ref_gspo_token_log_ratio(logp, old, mask)
    torch.testing.assert_close(fast_t[mask], ref_t[mask], **TOL)
    torch.testing.assert_close(
        grad_of((fast_t * wt * mask).sum(), logp), grad_of((ref_t * wt * mask).sum(), logp), **TOL
    )


@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28), (3e-4, 4e-4)])
@pytest.mark.parametrize("c", [None, 3.0, 10.0])
def test_clipped_surrogate(clips, c):
    g = _gen(23)
    B, T = 10, 30
    w = torch.exp(1.0 * _randn(g, B, T)).requires_grad_(True)
    A = _randn(g, B, T).requires_grad_(True)
    lo, hi = clips
    fast = C.clipped_surrogate(w, A, clip_low=lo, clip_high=hi, dual_clip_c=c)
    ref = R.ref_clipped_surrogate(w, A, lo, hi, c)
    torch.testing.assert_close(fast, ref, **TOL)
    gw = _randn(g, B, T)
    gf = torch.autograd.grad((fast * gw).sum(), (w, A))
    gr = torch.autograd.grad((ref * gw).sum(), (w, A))
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    wd, Ad = w.detach(), A.detach()
    assert ((Ad > 0) & (wd > 1 + hi)).any() and ((Ad < 0) & (wd < 1 - lo)).any()
    assert ((wd > 1 - lo) & (wd < 1 + hi)).any() or hi < 1e-3
    if c is not None:
        assert ((Ad < 0) & (wd > c)).any()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate(estimator):
    g = _gen(24)
    mask = ragged_mask(6, 10, g, holes=True)
    ref = _randn(g, 6, 10)
    logp = (ref + _randn(g, 6, 10)).requires_grad_(True)
    fast = C.kl_estimate(logp, ref, mask, estimator=estimator)
    refv = R.ref_kl(logp, ref, mask, estimator)
    torch.testing.assert_close(fast, refv, **TOL)
    wts = _randn(g, 6, 10)
    torch.testing.assert_close(
        grad_of((fast * wts).sum(), logp), grad_of((refv * wts).sum(), logp), **TOL
    )


def test_kl_estimate_default_is_k3():
    g = _gen(25)
    mask = ragged_mask(4, 6, g)
    ref = _randn(g, 4, 6)
    logp = ref + _randn(g, 4, 6)
    torch.testing.assert_close(
        C.kl_estimate(logp, ref, mask), R.ref_kl(logp, ref, mask, "k3"), **TOL
    )


# ----------------------------------------------------------------------------------------------
# discounted sums and future KL


@functools.cache
def _drc_case(L, gamma):
    g = _gen(31 + L)
    x = _randn(g, 3, L)
    return x, R.ref_discounted_reverse_cumsum(x, gamma)


@pytest.mark.parametrize("L", [1, 37, 150])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("chunk", [1, 3, 128, "L", "L+7"])
def test_discounted_reverse_cumsum(L, gamma, chunk):
    x, ref = _drc_case(L, gamma)
    k = {"L": L, "L+7": L + 7}.get(chunk, chunk)
    torch.testing.assert_close(C.discounted_reverse_cumsum(x, gamma, chunk_size=k), ref, **FKL_TOL)


@functools.cache
def _fkl_case(L, decay, c):
    """(log_ratio, mask, reference F) for a ragged batch with planted ratio spikes above c."""
    g = _gen(1000 + L)
    B = 5
    mask = ragged_mask(B, L, g, holes=L > 2)
    x = 0.5 * _randn(g, B, L)
    spikes = torch.rand(B, L, generator=g) < 0.08
    x = torch.where(spikes, x + 3.0, x)
    x[0, 0] = 3.5  # row 0 is full: at least one valid token above the filter threshold
    x = torch.where(mask, x, 7.0 * _randn(g, B, L))  # garbage in padding, must not leak
    if L <= 64:
        ref = R.ref_future_kl_naive(x, mask, decay, c)
    else:
        ref = R.ref_future_kl_scan(x, mask, decay, c)
    return x, mask, ref


FKL_PARAMS = [(32.0, 10.0), (4.0, None), (1000.0, 2.0)]


@pytest.mark.parametrize("L", [1, 5, 37, 300])
@pytest.mark.parametrize("chunk", [1, 3, 128, "L", "L+7"])
@pytest.mark.parametrize("decay,c", FKL_PARAMS)
def test_future_kl(L, chunk, decay, c):
    x, mask, ref = _fkl_case(L, decay, c)
    k = {"L": L, "L+7": L + 7}.get(chunk, chunk)
    fast = C.future_kl(x, mask, decay_rate=decay, dual_clip_c=c, chunk_size=k)
    torch.testing.assert_close(fast, ref, **FKL_TOL)
    quad = R.future_kl_quadratic(x, mask, decay_rate=decay, dual_clip_c=c, chunk_size=k)
    torch.testing.assert_close(quad, ref, **FKL_TOL)
    assert bool((fast[~mask] == 0).all())
    if c is not None:
        assert bool((mask & (x.exp() > c)).any())  # the filter fires


@pytest.mark.parametrize("L", [1, 6, 64])
@pytest.mark.parametrize("decay,c", FKL_PARAMS)
def test_future_kl_reference_naive_equals_scan(L, decay, c):
    x, mask, naive = _fkl_case(L, decay, c)
    torch.testing.assert_close(
        R.ref_future_kl_scan(x, mask, decay, c), naive, rtol=1e-13, atol=1e-13
    )


def test_future_kl_reference_naive_equals_scan_long():
    g = _gen(1099)
    mask = ragged_mask(1, 300, g, lengths=[290], holes=True)
    x = 0.5 * _randn(g, 1, 300)
    torch.testing.assert_close(
        R.ref_future_kl_scan(x, mask, 32.0, 10.0),
        R.ref_future_kl_naive(x, mask, 32.0, 10.0),
        rtol=1e-12,
        atol=1e-12,
    )


def test_future_kl_default_decay():
    x, mask, _ = _fkl_case(37, 32.0, None)
    torch.testing.assert_close(
        C.future_kl(x, mask), R.ref_future_kl_scan(x, mask, 32.0, None), **FKL_TOL
    )


# ----------------------------------------------------------------------------------------------
# advantages, returns, token rewards


def _group_rewards(B, group_size, g):
    r = torch.randint(0, 2, (B,), generator=g).to(DT) + 0.3 * _randn(g, B)
    if group_size >= 2:
        r[:group_size] = 0.75  # a zero-variance group (exactly representable: mean is exact)
        r[group_size : 2 * group_size] = torch.tensor([1.0, 0.0] * group_size, dtype=DT)[
            :group_size
        ]
    return r


@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_group_advantages(group_size, scale, eps):
    g = _gen(41 + group_size)
    r = _group_rewards(16, group_size, g)
    fast = C.group_advantages(r, group_size, scale=scale, eps=eps)
    ref = R.ref_group_advantages(r, group_size, scale=scale, eps=eps)
    torch.testing.assert_close(fast, ref, **TOL)
    if group_size >= 2:
        assert bool((fast[:group_size] == 0).all())  # zero-variance group


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_centered_and_defaults(group_size):
    g = _gen(45)
    r = _group_rewards(8, group_size, g)
    torch.testing.assert_close(
        C.group_centered_advantages(r, group_size),
        R.ref_group_advantages(r, group_size, scale="none"),
        **TOL,
    )
    torch.testing.assert_close(
        C.group_advantages(r, group_size),
        R.ref_group_advantages(r, group_size, scale="std", eps=1e-6),
        **TOL,
    )


@pytest.mark.parametrize("group_size", [2, 4, 5])
def test_rloo_advantages(group_size):
    g = _gen(46)
    r = _group_rewards(20, group_size, g)
    torch.testing.assert_close(
        C.rloo_advantages(r, group_size), R.ref_rloo_advantages(r, group_size), **TOL
    )


def test_rloo_group_of_one_raises():
    with pytest.raises(ValueError):
        C.rloo_advantages(torch.ones(4, dtype=DT), 1)


def test_remax_advantages():
    g = _gen(47)
    B, T = 6, 9
    r, rg = _randn(g, B), _randn(g, B)
    rg[0] = r[0]  # same reward as greedy -> 0
    torch.testing.assert_close(C.remax_advantages(r, rg), R.ref_remax_advantages(r, rg), **TOL)
    mask = ragged_mask(B, T, g, holes=True)
    old, ref = _randn(g, B, T), _randn(g, B, T)
    tok = R.ref_token_level_rewards(r, mask, old, ref, 0.05, "k1")  # 0 off-mask
    torch.testing.assert_close(
        C.remax_advantages(tok, rg, mask), R.ref_remax_advantages(tok, rg, mask), **TOL
    )


def test_sppo_advantages():
    g = _gen(48)
    r = torch.randint(0, 2, (9,), generator=g).to(DT)
    z = (2.0 * _randn(g, 9)).requires_grad_(True)
    fast = C.sppo_advantages(r, z)
    torch.testing.assert_close(fast, R.ref_sppo_advantages(r, z), **TOL)
    assert not fast.requires_grad


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0), (0.9, 1.0)])
@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("holes", [False, True])
def test_gae(gamma, lam, whiten, holes):
    g = _gen(49)
    B, T = 6, 11
    mask = ragged_mask(B, T, g, holes=holes)
    rew = _randn(g, B, T)  # garbage off-mask too: must be skipped
    vals = _randn(g, B, T)
    adv, ret = C.gae_advantages(rew, vals, mask, gamma=gamma, lam=lam, whiten=whiten)
    ref_adv, ref_ret = R.ref_gae(rew, vals, mask, gamma, lam)
    if whiten:
        ref_adv = R.ref_whiten(ref_adv, mask)
    torch.testing.assert_close(adv, ref_adv, **TOL)
    torch.testing.assert_close(ret, ref_ret, **TOL)


def test_gae_defaults():
    g = _gen(50)
    mask = ragged_mask(5, 7, g)
    rew, vals = _randn(g, 5, 7), _randn(g, 5, 7)
    adv, ret = C.gae_advantages(rew, vals, mask)
    ref_adv, ref_ret = R.ref_gae(rew, vals, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, R.ref_whiten(ref_adv, mask), **TOL)
    torch.testing.assert_close(ret, ref_ret, **TOL)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
@pytest.mark.parametrize("holes", [False, True])
def test_token_level_rewards(estimator, kl_coef, holes):
    g = _gen(51)
    B, T = 6, 8
    mask = ragged_mask(B, T, g, holes=holes)
    scores, old, ref = _randn(g, B), _randn(g, B, T), _randn(g, B, T)
    fast = C.token_level_rewards(
        scores, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=kl_coef, kl_estimator=estimator
    )
    torch.testing.assert_close(
        fast, R.ref_token_level_rewards(scores, mask, old, ref, kl_coef, estimator), **TOL
    )
    torch.testing.assert_close(
        C.token_level_rewards(scores, mask), R.ref_token_level_rewards(scores, mask), **TOL
    )


# ----------------------------------------------------------------------------------------------
# FIPO pieces


@pytest.mark.parametrize(
    "bounds",
    [(1.0, 1.2, 10.0), (0.8, 1.2, 3.0), (None, 1.2, 4.0), (1.0, None, 10.0), (0.8, 1.2, None)],
)
@pytest.mark.parametrize("adv_dim", [1, 2])
def test_influence_weights(bounds, adv_dim):
    g = _gen(61)
    B, T = 8, 15
    mask = ragged_mask(B, T, g, holes=True)
    F = (0.4 * _randn(g, B, T)).requires_grad_(True)
    lr = 0.8 * _randn(g, B, T)
    lr[0, :4] = 3.0  # ratio ~ 20 on some tokens
    adv = _randn(g, B) if adv_dim == 1 else _randn(g, B, T)
    adv[0] = -1.0
    fmin, fmax, safety = bounds
    if adv_dim == 1:  # sequence-level advantages, broadcast to tokens (padding keeps garbage)
        adv = adv[:, None].expand(B, T).clone()
        adv[~mask] = _randn(g, int((~mask).sum()))
    fast = C.influence_weights(
        F, adv, lr, mask, influence_min=fmin, influence_max=fmax, safety_threshold=safety
    )
    ref = R.ref_influence_weights(F, adv, lr, mask, fmin, fmax, safety)
    torch.testing.assert_close(fast, ref, **TOL)
    assert not fast.requires_grad
    e = F.detach().exp()[mask]
    if fmax is not None:
        assert (e > fmax).any()
    if fmin is not None:
        assert (e < fmin).any()
    if safety is not None:
        hit = mask & (adv < 0) & (lr.exp() > safety)
        assert hit.any() and ((F.detach().exp() > 1.0) & hit).any()


@pytest.mark.parametrize("c", [10.0, 3.0])
@pytest.mark.parametrize("adv_dim", [1, 2])
def test_dual_clip_drop_mask(c, adv_dim):
    g = _gen(62)
    B, T = 8, 10
    mask = ragged_mask(B, T, g, holes=True)
    lr = 0.5 * _randn(g, B, T)
    lr[0, :3] = 3.0  # 3 tokens above c -> dropped if A < 0
    lr[3, 0] = 3.0  # exactly one -> kept
    lr[4, 0] = 3.0
    lr[4, 1] = 3.0
    lr = torch.where(mask, lr, torch.full_like(lr, 9.0))  # padding above c must not count
    adv = -_randn(g, B).abs() if adv_dim == 1 else -_randn(g, B, T).abs()
    adv[4] = 1.0  # positive advantage -> kept
    if adv_dim == 1:
        adv = adv[:, None].expand(B, T).clone()
    adv = torch.where(mask, adv, torch.full_like(adv, -1.0))  # negative garbage in padding
    fast = C.dual_clip_drop_mask(adv, lr, mask, c)
    ref = R.ref_drop_mask(adv, lr, mask, c)
    assert fast.dtype == torch.bool
    assert torch.equal(fast, ref)
    assert (~ref).any() and ref.any()


# ----------------------------------------------------------------------------------------------
# policy losses


def test_reference_preset_table_matches_library_defaults():
    """The reference's own preset table must agree with the API table; the library's must too."""
    assert set(C.POLICY_LOSS_NAMES) == set(R.POLICY_LOSS_PRESETS)
    for name, cfg in R.POLICY_LOSS_PRESETS.items():
        lib = C.POLICY_LOSS_DEFAULTS[name]
        checked = 0
        for key in (
            "ratio_level",
            "clip_low",
            "clip_high",
            "dual_clip_c",
            "agg",
            "kl_coef",
            "log_ratio_clamp",
            "kl_estimator",
            *R._FIPO_KEYS,
        ):
            if hasattr(lib, key) and (key in cfg):
                assert getattr(lib, key) == cfg[key], (name, key, getattr(lib, key), cfg[key])
                checked += 1
        assert checked >= 5, (name, lib)


NAMES = ["ppo", "grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "sppo", "fipo", "rloo", "remax"]
REGIMES = [("spiky", 100), ("holes", 101), ("moderate", 102), ("near", 103), ("onpolicy", 104)]


# GSPO takes [B] advantages only (its rejection of [B, T] is test_gspo_rejects_token_advantages)
POLICY_CASES = [
    (name, adv_dim, regime, seed)
    for name in NAMES
    for adv_dim in (1, 2)
    if not (name == "gspo" and adv_dim == 2)
    for regime, seed in REGIMES
]


@pytest.mark.parametrize("name,adv_dim,regime,seed", POLICY_CASES)
def test_policy_loss_vs_reference(name, adv_dim, regime, seed):
    logp, old, adv, mask, ref = policy_batch(seed, regime, adv_dim)
    kw = _preset_kwargs(name)
    (fl, fg), (rl, rg), out = run_both(
        name, logp, old, adv, mask, ref=ref if name == "grpo" else None, **kw
    )
    assert fl.dim() == 0
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)
    assert bool((fg[~mask] == 0).all())
    for v in out.metrics.values():
        assert v.dim() == 0 and not v.requires_grad
    # the regime really exercises the clipping rules
    cnt = trigger_counts(name, logp, old, adv, mask)
    cfg = R.POLICY_LOSS_PRESETS[name]
    if regime in ("spiky", "holes") and cfg["ratio_level"] == "token":
        assert cnt["hi"] > 0 and cnt["lo"] > 0 and cnt["inside"] > 0 and cnt["clamp"] > 0, cnt
        if cfg["dual_clip_c"] is not None:
            assert cnt["dual"] > 0, cnt
    if regime == "near" and cfg["ratio_level"] != "token":
        assert cnt["inside"] > 0 and cnt["hi"] + cnt["lo"] > 0, cnt
    if regime == "onpolicy":
        assert cnt["hi"] == cnt["lo"] == cnt["dual"] == 0
    # clip-fraction metrics, where the library reports them, agree with the reference counts
    n_valid = int(mask.sum())
    for key, k in (
        ("policy/clip_frac_high", "hi"),
        ("policy/clip_frac_low", "lo"),
        ("policy/dual_clip_frac", "dual"),
    ):
        if key in out.metrics:
            assert abs(float(out.metrics[key]) - cnt[k] / n_valid) < 1e-12, (key, cnt)


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_clipped_sequences_get_zero_gradient(name):
    logp, old, adv, mask, _ = policy_batch(103, "near", 1)
    (_, fg), (_, rg), _ = run_both(name, logp, old, adv, mask)
    ls = R.ref_sequence_log_ratio(logp, old, mask)
    s = ls.exp()
    clipped = ((adv > 0) & (s > 1 + 4e-4)) | ((adv < 0) & (s < 1 - 3e-4))
    nonempty = mask.any(dim=1)
    assert (clipped & nonempty).any() and (~clipped & nonempty).any()
    assert bool((fg[clipped] == 0).all())
    assert bool((fg[~clipped & nonempty].abs().sum(dim=1) > 0).all())
    torch.testing.assert_close(fg, rg, **TOL)


def test_gspo_rejects_token_advantages():
    logp, old, adv, mask, _ = policy_batch(105, "near", 2)
    with pytest.raises(ValueError):
        C.policy_loss("gspo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)


def test_missing_required_inputs_raise():
    logp, old, adv, mask, _ = policy_batch(106, "spiky", 1)
    with pytest.raises(ValueError):
        C.policy_loss("dr_grpo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)
    with pytest.raises(ValueError):
        C.policy_loss("grpo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)


@pytest.mark.parametrize("preset", sorted(C.FIPO_PRESETS))
@pytest.mark.parametrize("adv_dim", [1, 2])
@pytest.mark.parametrize(
    "regime,seed", [("spiky", 200), ("moderate", 201), ("holes", 202), ("gentle", 203)]
)
def test_fipo_presets(preset, adv_dim, regime, seed):
    hp = dict(C.FIPO_PRESETS[preset])
    logp, old, adv, mask, _ = policy_batch(seed, regime, adv_dim, B=10, T=16)
    (fl, fg), (rl, rg), out = run_both("fipo", logp, old, adv, mask, **hp)
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)
    cfg = _cfg("fipo", **{k: v for k, v in hp.items() if k != "chunk_size"})
    trig = fipo_triggers(logp, old, adv, mask, cfg)
    if regime == "gentle":
        assert trig["interior"] > 0, trig
    else:
        assert trig["at_max"] > 0 and trig["safety"] > 0, trig
        if cfg["influence_min"] is not None:
            assert trig["at_min"] > 0, trig
        if cfg["dual_clip_c"] is not None:
            assert trig["filtered"] > 0 and trig["dropped"] > 0 and trig["interior"] > 0, trig
    if cfg["drop_dual_clipped_sequences"] and cfg["dual_clip_c"] is not None:
        # dropped rows get exactly zero gradient
        keep = R.ref_drop_mask(
            adv,
            R.ref_token_log_ratio(logp, old, mask, clamp=cfg["log_ratio_clamp"]),
            mask,
            cfg["dual_clip_c"],
        )
        assert bool((fg[~keep] == 0).all())
        if "fipo/dropped_seqs" in out.metrics:
            assert int(out.metrics["fipo/dropped_seqs"]) == int((~keep & mask.any(dim=1)).sum())


FIPO_OVERRIDES = [
    dict(),
    dict(drop_dual_clipped_sequences=False),
    dict(influence_min=0.8, influence_max=1.2, safety_threshold=3.0),
    dict(influence_min=None, influence_max=1.5, decay_rate=4.0),
    dict(dual_clip_c=None, drop_dual_clipped_sequences=False),
    dict(dual_clip_c=3.0, safety_threshold=2.0, decay_rate=128.0),
    dict(log_ratio_clamp=None, agg="seq-mean-token-mean"),
    dict(kl_coef=0.1, kl_estimator="k2"),
]


@pytest.mark.parametrize("hp", FIPO_OVERRIDES, ids=[str(i) for i in range(len(FIPO_OVERRIDES))])
@pytest.mark.parametrize("adv_dim", [1, 2])
def test_fipo_overrides(hp, adv_dim):
    logp, old, adv, mask, ref = policy_batch(210, "spiky", adv_dim, B=10, T=16)
    (fl, fg), (rl, rg), _ = run_both("fipo", logp, old, adv, mask, ref=ref, **hp)
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)


@pytest.mark.parametrize("name", ["fipo", "dapo", "gspo_token"])
def test_policy_loss_long_sequences(name):
    """T = 300 > the default chunk of 128, so FIPO's future-KL runs over several chunks."""
    logp, old, adv, mask, _ = policy_batch(212, "moderate", 2, B=4, T=300)
    (fl, fg), (rl, rg), _ = run_both(name, logp, old, adv, mask)
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)
    if name == "fipo":
        trig = fipo_triggers(logp, old, adv, mask, _cfg("fipo"))
        assert trig["at_max"] > 0 and trig["at_min"] > 0 and trig["filtered"] > 0, trig
        assert int(mask.sum(dim=1).max()) > 128


def test_fipo_equals_dapo_on_policy():
    logp, old, adv, mask, _ = policy_batch(211, "onpolicy", 2)
    (fl, fg), _, _ = run_both("fipo", logp, old, adv, mask)
    (dl, dg), _, _ = run_both("dapo", logp, old, adv, mask)
    torch.testing.assert_close(fl, dl, **TOL)
    torch.testing.assert_close(fg, dg, **TOL)


OVERRIDES = [
    ("ppo", dict(kl_coef=0.1, kl_estimator="k1")),
    ("ppo", dict(kl_coef=0.1, kl_estimator="k2", agg="seq-mean-token-sum")),
    ("ppo", dict(log_ratio_clamp=0.5, dual_clip_c=None)),
    ("dapo", dict(agg="seq-mean-token-mean", clip_high=0.5)),
    ("grpo", dict(kl_coef=0.3, kl_estimator="k3", clip_low=0.1)),
    ("grpo", dict(kl_coef=0.0)),
    ("dr_grpo", dict(max_tokens=3000)),
    ("gspo", dict(log_ratio_clamp=2e-4)),
    ("gspo_token", dict(log_ratio_clamp=None, clip_low=1e-3, clip_high=1e-3)),
    ("sppo", dict(dual_clip_c=None, agg="seq-mean-token-sum-norm", max_tokens=7)),
    ("rloo", dict(clip_low=0.3, clip_high=0.1, dual_clip_c=1.5)),
]


@pytest.mark.parametrize(
    "name,hp", OVERRIDES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OVERRIDES)]
)
@pytest.mark.parametrize("regime,seed", [("spiky", 300), ("near", 301)])
def test_policy_loss_overrides(name, hp, regime, seed):
    logp, old, adv, mask, ref = policy_batch(seed, regime, 1)
    hp = dict(hp)
    if name == "dr_grpo" or "max_tokens" in hp:
        hp.setdefault("max_tokens", 20)
    (fl, fg), (rl, rg), _ = run_both(name, logp, old, adv, mask, ref=ref, **hp)
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)


@pytest.mark.parametrize("name", ["ppo", "grpo", "dr_grpo", "gspo", "fipo"])
def test_policy_loss_global_normalisers(name):
    logp, old, adv, mask, ref = policy_batch(310, "spiky", 1)
    kw = dict(_preset_kwargs(name))
    if R.POLICY_LOSS_PRESETS[name]["agg"] == "token-mean":
        kw["total_tokens"] = 211
    else:
        kw["total_sequences"] = 13
    (fl, fg), (rl, rg), _ = run_both(
        name, logp, old, adv, mask, ref=ref if name == "grpo" else None, **kw
    )
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_padding_garbage_is_ignored(name):
    """old = −1e4 on padding and no clamp: nothing may become inf/nan (spec §6 #3)."""
    logp, old, adv, mask, ref = policy_batch(320, "moderate", 1)
    old = torch.where(mask, old, torch.full_like(old, -1e4))
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    kw = dict(_preset_kwargs(name), log_ratio_clamp=None)
    (fl, fg), (rl, rg), _ = run_both(
        name, logp, old, adv, mask, ref=ref if name == "grpo" else None, **kw
    )
    assert torch.isfinite(fl) and bool(torch.isfinite(fg).all())
    torch.testing.assert_close(fl, rl, **TOL)
    torch.testing.assert_close(fg, rg, **TOL)


def test_policy_loss_all_padding_batch():
    logp, old, adv, _, ref = policy_batch(330, "spiky", 1)
    mask = torch.zeros_like(logp, dtype=torch.bool)
    for name in NAMES:
        (fl, fg), (rl, _), _ = run_both(
            name, logp, old, adv, mask, ref=ref if name == "grpo" else None, **_preset_kwargs(name)
        )
        assert float(fl.detach()) == 0.0 == float(rl.detach())
        assert bool((fg == 0).all())


# ----------------------------------------------------------------------------------------------
# value losses


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_bce_value_loss(agg):
    g = _gen(401)
    z = (3.0 * _randn(g, 9)).requires_grad_(True)
    y = torch.randint(0, 2, (9,), generator=g).to(DT)
    fast = C.bce_value_loss(z, y).loss
    ref = R.ref_bce_value_loss(z, y)
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(grad_of(fast, z), grad_of(ref, z), **TOL)
    # token-level form with mask
    mask = ragged_mask(6, 8, g, holes=True)
    z2 = (3.0 * _randn(g, 6, 8)).requires_grad_(True)
    y2 = torch.randint(0, 2, (6, 8), generator=g).to(DT)
    fast2 = C.bce_value_loss(z2, y2, mask, agg=agg).loss
    ref2 = R.ref_bce_value_loss(z2, y2, mask, agg=agg)
    torch.testing.assert_close(fast2, ref2, **TOL)
    torch.testing.assert_close(grad_of(fast2, z2), grad_of(ref2, z2), **TOL)


@pytest.mark.parametrize("clip", [0.5, 0.1, None])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clipped_value_loss(clip, agg):
    g = _gen(402)
    B, T = 6, 10
    mask = ragged_mask(B, T, g, holes=True)
    old_v = _randn(g, B, T)
    v = (old_v + 0.7 * _randn(g, B, T)).requires_grad_(True)
    ret = _randn(g, B, T)
    kw = {} if clip == 0.5 else {"clip": clip}
    fast = C.clipped_value_loss(v, old_v, ret, mask, agg=agg, **kw).loss
    ref = R.ref_clipped_value_loss(v, old_v, ret, mask, clip=clip, agg=agg)
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(grad_of(fast, v), grad_of(ref, v), **TOL)
    if clip is not None:
        vd = v.detach()
        outside = mask & ((vd - old_v).abs() > clip)
        assert outside.any()
