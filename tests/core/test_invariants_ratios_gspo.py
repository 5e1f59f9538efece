"""Spec §6 invariants 1–9: ratios and on-policy behaviour, GSPO and GSPO-token.

Float64 on CPU throughout. Expected values are computed from the spec's formulas with explicit
Python loops (``_agg_ref`` and friends below), never by calling the aggregation code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C

DT = torch.float64
EXACT = dict(rtol=1e-13, atol=1e-15)
MAX_TOKENS = 16.0
ALL_LOSSES = (
    "ppo", "grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "sppo", "fipo", "rloo", "remax",
)  # fmt: skip

# Aggregation each method must use, written down from the spec (§0.3, §1.4, §2.4, §3.4, §4.x),
# deliberately not read back from POLICY_LOSS_DEFAULTS.
SPEC_AGG = {
    "ppo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "gspo": "seq-mean-token-mean",
    "gspo_token": "seq-mean-token-mean",
    "sppo": "token-mean",
    "fipo": "token-mean",
    "rloo": "token-mean",
    "remax": "token-mean",
}
GSPO_LOW, GSPO_HIGH = 3e-4, 4e-4  # GSPO §5.1 clip range on s_i


# ----------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(lengths, T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _batch(seed: int, lengths, T: int, scale: float = 0.3):
    """(logp leaf, old, mask): random old log-probs in (−3.1, −0.1), logp = old + N(0, scale²)."""
    g = _gen(seed)
    mask = _mask(lengths, T)
    B = len(lengths)
    old = -3.0 * torch.rand(B, T, generator=g, dtype=DT) - 0.1
    logp = old + scale * torch.randn(B, T, generator=g, dtype=DT)
    return logp.requires_grad_(True), old, mask


def _adv(seed: int, B: int) -> torch.Tensor:
    return torch.randn(B, generator=_gen(seed), dtype=DT)


def _hp(name: str, **kw) -> dict:
    hp = {"max_tokens": MAX_TOKENS} if name == "dr_grpo" else {}
    hp.update(kw)
    return hp


def _loss(name, logp, old, adv, mask, ref=None, **kw):
    hp = _hp(name, **kw)
    if name == "grpo" and ref is None:
        hp.setdefault("kl_coef", 0.0)
    return C.policy_loss(
        name, logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, **hp
    )


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


def _agg_ref(values, mask, mode, max_tokens=None):
    """Spec §0.3 aggregation with explicit loops over rows; rows with no valid token are skipped."""
    rows = []
    for i in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if bool(mask[i, t])]
        if idx:
            rows.append((sum(values[i, t] for t in idx), len(idx)))
    zero = values.sum() * 0.0
    if not rows:
        return zero
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(s / max_tokens for s, _ in rows) / len(rows)
    raise AssertionError(mode)


def _spec_agg(name, values, mask):
    mode = SPEC_AGG[name]
    return _agg_ref(values, mask, mode, MAX_TOKENS if mode.endswith("norm") else None)


def _tokens(adv, mask):
    """Broadcast a [B] advantage to the valid tokens (0 elsewhere), by hand."""
    out = torch.zeros(mask.shape, dtype=adv.dtype)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                out[i, t] = adv[i]
    return out


def _with_log_s(seed, lengths, T, log_s, noise=0.05):
    """logp leaf and old with per-row masked mean of (logp − old) equal to ``log_s[i]``.

    Token log-ratios are noisy (so token ratios differ) but re-centred on the requested value.
    """
    g = _gen(seed)
    mask = _mask(lengths, T)
    B = len(lengths)
    old = -3.0 * torch.rand(B, T, generator=g, dtype=DT) - 0.1
    delta = noise * torch.randn(B, T, generator=g, dtype=DT)
    for i, n in enumerate(lengths):
        delta[i, :n] += log_s[i] - delta[i, :n].mean()
        delta[i, n:] = 0.7  # padding: arbitrary
    logp = (old + delta).requires_grad_(True)
    return logp, old, mask


# ----------------------------------------------------------------------------------------------
# Invariant 1: on-policy ratios are 1, nothing clips, loss = −agg(Â) (+ KL)


def test_inv01_on_policy_ratio_helpers_are_exactly_one():
    logp, _, mask = _batch(0, [5, 1, 3, 4], 5)
    logp = logp.detach()
    old = logp.clone()
    adv = _tokens(torch.tensor([1.0, -0.5, -2.0, 0.3], dtype=DT), mask)
    ones = torch.ones_like(logp)
    zeros = torch.zeros_like(logp)

    tok = C.token_log_ratio(logp, old, mask, clamp=20.0)
    assert torch.equal(tok, zeros)
    assert torch.equal(torch.exp(tok), ones)  # w = 1 everywhere
    seq = C.sequence_log_ratio(logp, old, mask)
    assert torch.equal(torch.exp(seq), torch.ones(4, dtype=DT))  # GSPO s_i = 1
    gt = C.gspo_token_log_ratio(logp, old, mask)
    assert torch.equal(torch.exp(gt), ones)  # GSPO-token s_{i,t} = 1

    fkl = C.future_kl(tok, mask, decay_rate=32.0, dual_clip_c=10.0)
    assert torch.equal(fkl, zeros)  # FIPO F ≡ 0
    for lo, hi in ((1.0, 1.2), (0.8, 1.2), (None, None)):
        # safety_threshold 0.5 < w = 1 makes the safety clamp fire on the A < 0 tokens
        for safety in (10.0, 0.5, None):
            f = C.influence_weights(
                fkl, adv, tok, mask, influence_min=lo, influence_max=hi, safety_threshold=safety
            )
            assert torch.equal(f, ones), (lo, hi, safety)  # f ≡ 1

    for lo, hi, c in ((0.2, 0.2, 3.0), (0.2, 0.28, 10.0), (GSPO_LOW, GSPO_HIGH, None)):
        masks = C.clip_masks(ones, adv, mask, clip_low=lo, clip_high=hi, dual_clip_c=c)
        for key, m in masks.items():
            assert not m.any(), key  # no token is clipped


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_inv01_on_policy_loss_equals_minus_agg_advantage_and_no_clipping(name):
    lengths = [6, 2, 4, 1, 5]
    logp, _, mask = _batch(1, lengths, 6)
    old = logp.detach().clone()
    adv = torch.tensor([1.3, -0.4, 0.0, -2.1, 0.8], dtype=DT)
    ref = old - 0.2 * torch.randn(old.shape, generator=_gen(2), dtype=DT)  # ref ≠ θ
    out = _loss(name, logp, old, adv, mask, ref=ref)

    expected = -_spec_agg(name, _tokens(adv, mask), mask)
    if name == "grpo":  # + β·agg(k3), k3 = exp(ref − logp) + (logp − ref) − 1 (GRPO Eq. 4)
        rho = logp.detach() - ref
        k3 = torch.exp(-rho) + rho - 1.0
        expected = expected + 0.04 * _spec_agg(name, k3, mask)
    assert_close(out.loss, expected, **EXACT)

    m = out.metrics
    for key in ("policy/clip_frac", "policy/clip_frac_low", "policy/clip_frac_high"):
        assert m[key].item() == 0.0, key
    assert m["policy/dual_clip_frac"].item() == 0.0
    for key in ("policy/ratio_mean", "policy/ratio_min", "policy/ratio_max"):
        assert m[key].item() == 1.0, key
    assert m["policy/kl_old"].item() == 0.0
    if name in ("gspo", "gspo_token"):
        assert m["policy/seq_clip_frac"].item() == 0.0
    if name == "fipo":
        for key in ("fipo/weight_mean", "fipo/weight_min", "fipo/weight_max"):
            assert m[key].item() == 1.0, key
        assert m["fipo/future_kl_mean"].item() == 0.0
        assert m["fipo/weight_above_1_frac"].item() == 0.0
        assert m["fipo/dropped_seqs"].item() == 0.0


# ----------------------------------------------------------------------------------------------
# Invariant 2: at θ = θ_old every clipped method's gradient is the vanilla policy gradient


def _tiny_policy(seed: int, lengths, T: int, V: int = 7, H: int = 4):
    """A linear 'LM': logits = x_t · W. Returns (W leaf, logp(W) function, mask)."""
    g = _gen(seed)
    B = len(lengths)
    feats = torch.randn(B, T, H, generator=g, dtype=DT)
    tokens = torch.randint(V, (B, T), generator=g)
    W = torch.randn(H, V, generator=g, dtype=DT).requires_grad_(True)
    return W, (lambda w: C.token_logprobs(feats @ w, tokens)), _mask(lengths, T)


@pytest.mark.parametrize(
    ("name", "adv_kind"),
    [(n, k) for n in ALL_LOSSES for k in ("sequence", "token") if (n, k) != ("gspo", "token")],
)  # gspo takes one advantage per sequence (its [B, T] error is tested in test_fixtures)
def test_inv02_on_policy_gradient_equals_vanilla_policy_gradient(name, adv_kind):
    lengths = [5, 2, 4, 1]
    W, logp_of, mask = _tiny_policy(3, lengths, 5)
    B = len(lengths)
    if adv_kind == "sequence":
        adv = torch.tensor([1.1, -0.7, 0.4, -1.5], dtype=DT)
        adv_tok = _tokens(adv, mask)
    else:
        adv = torch.randn(B, 5, generator=_gen(4), dtype=DT)
        adv_tok = torch.where(mask, adv, torch.zeros_like(adv))

    logp = logp_of(W)
    old = logp.detach()  # θ = θ_old
    loss = _loss(name, logp, old, adv, mask).loss
    (g_w,) = torch.autograd.grad(loss, W, retain_graph=True)
    g_logp = _grad(loss, logp)

    # vanilla policy gradient: ∇ of −agg(Â_t · logp_t) under the method's own aggregation
    logp2 = logp_of(W)
    vanilla = -_spec_agg(name, adv_tok * logp2, mask)
    (v_w,) = torch.autograd.grad(vanilla, W, retain_graph=True)
    v_logp = _grad(vanilla, logp2)

    assert v_w.abs().max() > 1e-3  # the comparison is not vacuous
    assert_close(g_w, v_w, **EXACT)
    assert_close(g_logp, v_logp, **EXACT)


def test_inv02_gspo_and_grpo_gradients_coincide_on_policy_under_seq_mean_token_mean():
    lengths = [6, 3, 1, 4, 5]
    W, logp_of, mask = _tiny_policy(5, lengths, 6)
    adv = torch.tensor([0.9, -1.2, 0.3, 0.0, -0.6], dtype=DT)
    grads = {}
    for name, kw in (
        ("gspo", {}),
        ("gspo_token", {}),
        ("grpo", {"kl_coef": 0.0}),
    ):
        logp = logp_of(W)
        loss = _loss(name, logp, logp.detach(), adv, mask, **kw).loss
        (grads[name],) = torch.autograd.grad(loss, W)
    # GRPO keeps its default KL: with π_ref = π_θ the k3 gradient (1 − e^{−ρ}) vanishes at ρ = 0
    logp = logp_of(W)
    loss = _loss("grpo", logp, logp.detach(), adv, mask, ref=logp.detach()).loss
    (grads["grpo_kl"],) = torch.autograd.grad(loss, W)

    assert grads["gspo"].abs().max() > 1e-3
    assert_close(grads["gspo"], grads["grpo"], **EXACT)
    assert_close(grads["gspo_token"], grads["grpo"], **EXACT)
    assert_close(grads["grpo_kl"], grads["grpo"], **EXACT)


@pytest.mark.parametrize("adv_kind", ["sequence", "token"])
def test_inv02_fipo_and_dapo_coincide_on_policy(adv_kind):
    lengths = [7, 4, 2, 6]
    W, logp_of, mask = _tiny_policy(6, lengths, 7)
    if adv_kind == "sequence":
        adv = torch.tensor([1.0, -1.0, -0.5, 0.25], dtype=DT)
    else:
        adv = torch.randn(4, 7, generator=_gen(7), dtype=DT)
    outs, grads = {}, {}
    for name in ("fipo", "dapo"):
        logp = logp_of(W)
        outs[name] = _loss(name, logp, logp.detach(), adv, mask).loss
        (grads[name],) = torch.autograd.grad(outs[name], W)
    assert grads["dapo"].abs().max() > 1e-3
    assert_close(outs["fipo"], outs["dapo"], **EXACT)
    assert_close(grads["fipo"], grads["dapo"], **EXACT)


# ----------------------------------------------------------------------------------------------
# Invariant 3: log-space ratios; padding log-probs of −1e4 / −inf never leak


@pytest.mark.parametrize("logp_pad", ["finite", "same"])
@pytest.mark.parametrize("pad", [-1e4, -math.inf])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_inv03_padded_old_logprobs_give_no_inf_or_nan_for_every_loss(name, pad, logp_pad):
    lengths = [5, 2, 0, 4]  # includes a fully padded row
    clean_logp, old, mask = _batch(8, lengths, 6, scale=0.4)
    clean_logp = clean_logp.detach()
    ref = old + 0.1 * torch.randn(old.shape, generator=_gen(9), dtype=DT)
    adv = torch.tensor([1.0, -1.5, 0.7, -0.2], dtype=DT)
    hp = {"kl_coef": 0.04} if name != "grpo" else {}  # exercise the KL path for every name

    def run(pad_old, pad_logp):
        o = torch.where(mask, old, torch.full_like(old, pad_old))
        r = torch.where(mask, ref, torch.full_like(ref, pad_old))
        lp = torch.where(mask, clean_logp, torch.full_like(clean_logp, pad_logp))
        lp.requires_grad_(True)
        out = _loss(name, lp, o, adv, mask, ref=r, **hp)
        return out, _grad(out.loss, lp)

    padded, g_padded = run(pad, pad if logp_pad == "same" else 0.3)
    clean, g_clean = run(0.0, 0.0)
    assert torch.isfinite(padded.loss)
    assert torch.isfinite(g_padded).all()
    for key, v in padded.metrics.items():
        assert torch.isfinite(v), key
    assert torch.equal(g_padded[~mask], torch.zeros_like(g_padded[~mask]))
    # padding is invisible: same loss, gradient and metrics as with benign padding values
    assert_close(padded.loss, clean.loss, rtol=0, atol=0)
    assert_close(g_padded, g_clean, rtol=0, atol=0)
    for key in clean.metrics:
        assert_close(padded.metrics[key], clean.metrics[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("pad", [-1e4, -math.inf])
def test_inv03_ratio_and_kl_helpers_are_zero_and_finite_on_padding(pad):
    """The helpers themselves (not only the losses) return exactly 0 on padding, so a caller
    that sums or exponentiates their output cannot pick up inf/nan."""
    logp, old, mask = _batch(20, [4, 1, 0], 5, scale=0.4)
    old_p = torch.where(mask, old, torch.full_like(old, pad))
    for lp_pad in (0.0, pad):
        lp = torch.where(mask, logp.detach(), torch.full_like(old, lp_pad)).requires_grad_(True)
        outs = {
            "token": C.token_log_ratio(lp, old_p, mask, clamp=20.0),
            "token_noclamp": C.token_log_ratio(lp, old_p, mask),
            "gspo_token": C.gspo_token_log_ratio(lp, old_p, mask, clamp=10.0),
            "gspo_seq": C.broadcast_to_tokens(C.sequence_log_ratio(lp, old_p, mask), mask),
        }
        for est in C.KL_ESTIMATORS:
            outs[est] = C.kl_estimate(lp, old_p, mask, est)
        for key, v in outs.items():
            assert torch.isfinite(v).all(), key
            assert torch.equal(v[~mask], torch.zeros_like(v[~mask])), key
            g = _grad((torch.exp(v) * 1.5).sum(), lp)
            assert torch.isfinite(g).all(), key
            assert torch.equal(g[~mask], torch.zeros_like(g[~mask])), key


def test_inv03_log_ratio_clamp_keeps_ratios_finite():
    mask = torch.ones(1, 6, dtype=torch.bool)
    old = torch.zeros(1, 6, dtype=DT)
    logp = torch.tensor([[-800.0, -50.0, -20.0, 20.0, 50.0, 800.0]], dtype=DT)
    tok = C.token_log_ratio(logp, old, mask, clamp=20.0)
    assert_close(tok, torch.tensor([[-20.0, -20.0, -20.0, 20.0, 20.0, 20.0]], dtype=DT), **EXACT)
    assert torch.isfinite(torch.exp(tok)).all()
    assert torch.isfinite(torch.exp(logp - old)).logical_not().any()  # without the clamp: inf

    # through the losses: |δ| far beyond the clamp still gives finite values and gradients
    lp = logp.clone().requires_grad_(True)
    for name in ALL_LOSSES:
        adv = torch.tensor([-1.0], dtype=DT) if name == "gspo" else -torch.ones(1, 6, dtype=DT)
        out = _loss(name, lp, old, adv, mask)
        assert torch.isfinite(out.loss), name
        assert torch.isfinite(_grad(out.loss, lp)).all(), name


# ----------------------------------------------------------------------------------------------
# Invariant 4: s_i is the geometric mean; padding-invariant


def test_inv04_gspo_ratio_is_geometric_mean_and_padding_invariant():
    lengths = [6, 1, 3, 5]
    logp, old, mask = _batch(10, lengths, 6, scale=0.5)
    logp = logp.detach()
    log_s = C.sequence_log_ratio(logp, old, mask)
    for i, n in enumerate(lengths):
        w = [math.exp(float(logp[i, t] - old[i, t])) for t in range(n)]
        geo = math.prod(w) ** (1.0 / n)  # geometric mean of the masked token ratios
        mean_delta = sum(float(logp[i, t] - old[i, t]) for t in range(n)) / n
        assert math.isclose(float(torch.exp(log_s[i])), geo, rel_tol=1e-13)
        assert math.isclose(float(log_s[i]), mean_delta, rel_tol=1e-13, abs_tol=1e-15)
    assert_close(log_s, C.masked_mean(logp - old, mask, dim=-1), **EXACT)

    # more padding columns, filled with hostile values, and different values in old padding
    g = _gen(11)
    extra = 5
    garbage = torch.randn(4, extra, generator=g, dtype=DT) * 1e4
    logp_p = torch.cat([logp, garbage], dim=1)
    old_p = torch.cat([old, torch.full((4, extra), -math.inf, dtype=DT)], dim=1)
    old_p = torch.where(torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], 1), old_p, -1e4)
    mask_p = torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], dim=1)
    assert_close(C.sequence_log_ratio(logp_p, old_p, mask_p), log_s, rtol=0, atol=1e-15)

    # and the GSPO loss (value and gradient on the valid tokens) does not see the padding
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=DT)
    a = logp.clone().requires_grad_(True)
    b = logp_p.clone().requires_grad_(True)
    la = _loss("gspo", a, old, adv, mask, clip_low=0.2, clip_high=0.2).loss
    lb = _loss("gspo", b, old_p, adv, mask_p, clip_low=0.2, clip_high=0.2).loss
    assert_close(la, lb, **EXACT)
    gb = _grad(lb, b)
    assert_close(_grad(la, a), gb[:, :6], **EXACT)
    assert torch.equal(gb[:, 6:], torch.zeros(4, extra, dtype=DT))


# ----------------------------------------------------------------------------------------------
# Invariant 5: s_i is order-free; FIPO's Future-KL is not


def test_inv05_gspo_ratio_is_permutation_invariant_unlike_fipo():
    lengths = [7, 4, 6]
    logp, old, mask = _batch(12, lengths, 7, scale=0.3)
    logp = logp.detach()
    delta = logp - old
    g = _gen(13)
    logp_perm = logp.clone()
    for i, n in enumerate(lengths):
        perm = torch.randperm(n, generator=g)
        while torch.equal(perm, torch.arange(n)):
            perm = torch.randperm(n, generator=g)
        logp_perm[i, :n] = old[i, :n] + delta[i, :n][perm]
    s = C.sequence_log_ratio(logp, old, mask)
    s_perm = C.sequence_log_ratio(logp_perm, old, mask)
    assert_close(s_perm, s, rtol=0, atol=1e-15)

    adv = torch.tensor([1.0, -0.5, 0.8], dtype=DT)
    for name in ("gspo", "gspo_token"):
        kw = {"clip_low": 0.5, "clip_high": 0.5}
        assert_close(
            _loss(name, logp_perm, old, adv, mask, **kw).loss,
            _loss(name, logp, old, adv, mask, **kw).loss,
            rtol=0,
            atol=1e-15,
        )

    # FIPO's Future-KL depends on token order (a discounted suffix sum)
    f = C.future_kl(C.token_log_ratio(logp, old, mask), mask, decay_rate=2.0)
    f_perm = C.future_kl(C.token_log_ratio(logp_perm, old, mask), mask, decay_rate=2.0)
    assert (f - f_perm).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Invariant 6: GSPO-token's value is s_i, bit for bit


def test_inv06_gspo_token_ratio_equals_sequence_ratio_bitwise():
    lengths = [8, 3, 1, 6, 0]
    logp, old, mask = _batch(14, lengths, 8, scale=0.4)
    seq = C.sequence_log_ratio(logp, old, mask)
    tok = C.gspo_token_log_ratio(logp, old, mask)
    expected = torch.where(mask, seq[:, None].expand_as(tok), torch.zeros_like(tok))
    assert torch.equal(tok.detach(), expected.detach())  # bit-for-bit
    assert torch.equal(torch.exp(tok)[mask], torch.exp(seq)[:, None].expand_as(tok)[mask])

    # gradient of log s_{i,t} is ∇ log π_{i,t} (its own token only, no cross-token terms)
    weights = torch.randn(logp.shape, generator=_gen(15), dtype=DT)
    g = _grad((tok * weights).sum(), logp)
    assert_close(g, torch.where(mask, weights, torch.zeros_like(weights)), rtol=0, atol=0)

    # through the loss: the two methods report the same ratio statistics
    adv = torch.tensor([1.0, -1.0, 0.5, 0.2, 0.3], dtype=DT)
    m_seq = _loss("gspo", logp, old, adv, mask).metrics
    m_tok = _loss("gspo_token", logp, old, adv, mask).metrics
    for key in ("policy/ratio_mean", "policy/ratio_min", "policy/ratio_max"):
        assert torch.equal(m_seq[key], m_tok[key]), key


# ----------------------------------------------------------------------------------------------
# Invariant 7: GSPO-token with Â_{i,t} = Â_i equals GSPO (value, clip decision, gradient)

# rows: (Â_i, log s_i) chosen to land in each clip region of [1 − 3e-4, 1 + 4e-4]
_ROWS = [
    (1.0, 2e-3),  # Â > 0, s > 1 + ε_high   → clipped (high)
    (0.7, -1e-3),  # Â > 0, s < 1 − ε_low    → not clipped (gradient flows)
    (-0.5, -2e-3),  # Â < 0, s < 1 − ε_low    → clipped (low)
    (-1.2, 1e-3),  # Â < 0, s > 1 + ε_high   → not clipped
    (0.9, 1e-4),  # inside the range
    (-0.3, -1e-4),  # inside the range
]
_LENGTHS = [7, 3, 5, 2, 6, 4]
_CLIPPED = [True, False, True, False, False, False]


def _gspo_expected_grad(logp, old, adv, mask, clipped):
    """−s_i Â_i / (B·|y_i|) on each valid token of an unclipped row, 0 on a clipped row."""
    B = mask.shape[0]
    out = torch.zeros(mask.shape, dtype=DT)
    for i in range(B):
        n = int(mask[i].sum())
        if clipped[i] or n == 0:
            continue
        log_s = sum(float(logp[i, t] - old[i, t]) for t in range(n)) / n
        for t in range(n):
            out[i, t] = -math.exp(log_s) * float(adv[i]) / (B * n)
    return out


def test_inv07_gspo_token_equals_gspo_value_clip_and_gradient_formula():
    logp, old, mask = _with_log_s(16, _LENGTHS, 7, [r[1] for r in _ROWS])
    lp = logp.detach()
    adv = torch.tensor([r[0] for r in _ROWS], dtype=DT)
    seq = _loss("gspo", logp, old, adv, mask)
    tok = _loss("gspo_token", logp, old, _tokens(adv, mask), mask)  # Â_{i,t} = Â_i
    g_seq, g_tok = _grad(seq.loss, logp), _grad(tok.loss, logp)

    assert_close(tok.loss, seq.loss, **EXACT)
    expected = _gspo_expected_grad(logp.detach(), old, adv, mask, _CLIPPED)
    assert_close(g_seq, expected, **EXACT)
    assert_close(g_tok, expected, **EXACT)
    for i, clipped in enumerate(_CLIPPED):  # the formula is not vacuous on any row
        assert (g_seq[i][mask[i]] == 0).all() == clipped

    # per-sequence clip decision is identical and is the one designed above
    n_tok = sum(_LENGTHS)
    for m in (seq.metrics, tok.metrics):
        assert_close(m["policy/seq_clip_frac"], torch.tensor(2 / 6, dtype=DT), **EXACT)
        assert_close(m["policy/clip_frac_high"], torch.tensor(7 / n_tok, dtype=DT), **EXACT)
        assert_close(m["policy/clip_frac_low"], torch.tensor(5 / n_tok, dtype=DT), **EXACT)
    for key in seq.metrics:
        assert_close(tok.metrics[key], seq.metrics[key], **EXACT, msg=key)

    # expected loss value: (1/B) Σ_i −min(s Â, clip(s) Â)  (one term per sequence)
    vals = []
    for i, (a, _) in enumerate(_ROWS):
        n = _LENGTHS[i]
        s = math.exp(sum(float(lp[i, t] - old[i, t]) for t in range(n)) / n)
        sc = min(max(s, 1 - GSPO_LOW), 1 + GSPO_HIGH)
        vals.append(-min(s * a, sc * a))
    assert_close(seq.loss, torch.tensor(sum(vals) / 6, dtype=DT), **EXACT)


@pytest.mark.parametrize("equal_lengths", [False, True])
def test_inv07_negative_token_mean_gspo_is_not_gspo_unless_lengths_equal(equal_lengths):
    """Spec inv. 7 negative test. Token-mean re-weights sequences by length (§1.4), so under
    token-mean the GSPO/GSPO-token gradient is −s_i Â_i / Σ_j|y_j| instead of
    −s_i Â_i / (B·|y_i|); the two agree only when all lengths are equal.

    Note: GSPO and GSPO-token themselves stay equal to each other under token-mean (their
    per-token losses are identical in value and every aggregation weights a row's tokens
    uniformly), so the difference is "token-mean vs seq-mean-token-mean", which is what we test.
    """
    lengths = [5, 5, 5, 5, 5, 5] if equal_lengths else _LENGTHS
    logp, old, mask = _with_log_s(17, lengths, 7, [r[1] for r in _ROWS])
    adv = torch.tensor([r[0] for r in _ROWS], dtype=DT)
    ref_out = _loss("gspo", logp, old, adv, mask)  # seq-mean-token-mean (GSPO proper)
    ref_grad = _grad(ref_out.loss, logp)
    formula = _gspo_expected_grad(logp.detach(), old, adv, mask, _CLIPPED)
    assert_close(ref_grad, formula, **EXACT)

    for name, a in (("gspo", adv), ("gspo_token", _tokens(adv, mask))):
        out = _loss(name, logp, old, a, mask, agg="token-mean")
        g = _grad(out.loss, logp)
        # what token-mean actually gives: −s_i Â_i / Σ_j |y_j| on unclipped rows
        tm = formula * (len(lengths) * torch.tensor(lengths, dtype=DT)[:, None]) / sum(lengths)
        assert_close(g, tm, **EXACT)
        if equal_lengths:
            assert_close(out.loss, ref_out.loss, **EXACT)
            assert_close(g, ref_grad, **EXACT)
        else:
            assert not torch.allclose(out.loss, ref_out.loss, rtol=1e-6, atol=0)
            assert not torch.allclose(g, ref_grad, rtol=1e-6, atol=0)

    # GSPO vs GSPO-token under token-mean: identical (see docstring)
    o1 = _loss("gspo", logp, old, adv, mask, agg="token-mean")
    o2 = _loss("gspo_token", logp, old, _tokens(adv, mask), mask, agg="token-mean")
    assert_close(o1.loss, o2.loss, **EXACT)
    assert_close(_grad(o1.loss, logp), _grad(o2.loss, logp), **EXACT)


# ----------------------------------------------------------------------------------------------
# Invariant 8: a clipped GSPO sequence has zero gradient; clip fraction counts all its tokens


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_inv08_gspo_clipped_sequence_zero_gradient_and_clip_fraction(name):
    lengths = [4, 6, 2, 5, 3]
    log_s = [5e-3, 0.0, -4e-3, -1e-2, 2e-3]
    signs = [1.0, 1.0, -1.0, 1.0, -1.0]
    # row 0: Â>0, s>1+ε_h clipped; row 1: s=1 free; row 2: Â<0, s<1−ε_l clipped;
    # row 3: Â>0, s<1−ε_l free; row 4: Â<0, s>1+ε_h free
    clipped = [True, False, True, False, False]
    logp, old, mask = _with_log_s(18, lengths, 6, log_s, noise=0.2)
    adv = torch.tensor(signs, dtype=DT) * torch.tensor([1.5, 0.5, 2.0, 0.8, 1.1], dtype=DT)
    out = _loss(name, logp, old, adv if name == "gspo" else _tokens(adv, mask), mask)
    g = _grad(out.loss, logp)
    for i, c in enumerate(clipped):
        row = g[i][mask[i]]
        assert torch.equal(row, torch.zeros_like(row)) == c, i
    n_clipped_tokens = sum(n for n, c in zip(lengths, clipped, strict=True) if c)
    assert_close(
        out.metrics["policy/clip_frac"],
        torch.tensor(n_clipped_tokens / sum(lengths), dtype=DT),
        **EXACT,
    )
    assert_close(out.metrics["policy/seq_clip_frac"], torch.tensor(2 / 5, dtype=DT), **EXACT)


# ----------------------------------------------------------------------------------------------
# Invariant 9: identical rewards in a group ⇒ Â = 0 ⇒ zero GSPO loss and gradient


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_inv09_gspo_identical_rewards_zero_loss_and_gradient(name):
    G = 4
    rewards = torch.tensor([1.0] * G + [0.0] * G + [-1.0] * G + [0.5] * G, dtype=DT)
    adv = C.group_advantages(rewards, G)  # eps = 1e-6 keeps 0/0 away
    assert torch.equal(adv, torch.zeros_like(adv))
    lengths = [6, 3, 5, 1] * 4
    logp, old, mask = _batch(19, lengths, 6, scale=0.3)  # off-policy: ratios far from 1
    out = _loss(name, logp, old, adv if name == "gspo" else _tokens(adv, mask), mask)
    g = _grad(out.loss, logp)
    assert out.loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))

    # rewards whose group mean is not exactly representable: Â is 0 up to rounding / eps
    r2 = torch.full((3,), 0.7, dtype=DT)
    assert_close(C.group_advantages(r2, 3), torch.zeros(3, dtype=DT), rtol=0, atol=1e-9)
