"""Hand-computed fixtures: tiny inputs whose expected outputs are derived in the comments.

Ratios are set through log-probs: ``logp = old + log(w)``, so ``w`` is exact up to one rounding
(hence rtol 1e-12 rather than bit equality). Float64 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C
from reference import future_kl_quadratic

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)
LN2 = math.log(2.0)


def _t(x, dtype=DT):
    return torch.tensor(x, dtype=dtype)


def _inputs(ratios, lengths=None, old_value=-1.5):
    """logp leaf (with logp − old = log w on valid tokens), old, mask from a [B][T] ratio table.

    Entries of ``ratios`` past a row's length are padding (any value, here ignored).
    """
    w = _t(ratios)
    B, T = w.shape
    lengths = lengths or [T] * B
    mask = torch.arange(T)[None, :] < _t(lengths, torch.long)[:, None]
    old = torch.full((B, T), old_value, dtype=DT)
    logp = torch.where(mask, old + torch.log(w), torch.full_like(old, -7.0))
    return logp.requires_grad_(True), old, mask


def _run(name, ratios, adv, lengths=None, **kw):
    logp, old, mask = _inputs(ratios, lengths)
    out = C.policy_loss(name, logprobs=logp, old_logprobs=old, advantages=_t(adv), mask=mask, **kw)
    (g,) = torch.autograd.grad(out.loss, logp)
    return out, g


# ----------------------------------------------------------------------------------------------
# clipped surrogate: above, below, inside, dual clip


def test_fixture_dapo_clip_from_above_inside_and_below_with_positive_advantage():
    # DAPO: ε_low 0.2, ε_high 0.28, token-mean. One row, Â = 2, w = [1.5, 1.0, 0.5].
    #  t0: w = 1.5 > 1.28: ℓ = max(−2·1.5, −2·1.28) = −2.56   (clipped: zero gradient)
    #  t1: w = 1.0:        ℓ = −2·1.0 = −2.0
    #  t2: w = 0.5 < 0.8, but Â > 0 so the lower bound never binds:
    #      ℓ = max(−2·0.5, −2·0.8) = max(−1.0, −1.6) = −1.0 (unclipped)
    #  loss = (−2.56 − 2.0 − 1.0)/3 = −5.56/3
    #  ∂loss/∂logp_t = −Â·w_t/3 on unclipped tokens: [0, −2/3, −1/3]
    out, g = _run("dapo", [[1.5, 1.0, 0.5]], [2.0])
    assert_close(out.loss, _t(-5.56 / 3), **TOL)
    assert_close(g, _t([[0.0, -2.0 / 3, -1.0 / 3]]), **TOL)
    assert_close(out.metrics["policy/clip_frac_high"], _t(1 / 3), **TOL)
    assert out.metrics["policy/clip_frac_low"].item() == 0.0


def test_fixture_ppo_clip_from_below_with_negative_advantage():
    # PPO (verl vanilla): ε = 0.2, dual clip c = 3, token-mean. Â = −1, w = [0.5, 0.9, 1.5].
    #  t0: w = 0.5 < 0.8: ℓ = max(0.5, 0.8) = 0.8   (clipped from below: zero gradient)
    #  t1: w = 0.9:       ℓ = max(0.9, 0.9) = 0.9
    #  t2: w = 1.5 > 1.2, Â < 0 so the upper bound never binds: ℓ = max(1.5, 1.2) = 1.5,
    #      dual clip: min(1.5, −Â·c = 3) = 1.5
    #  loss = (0.8 + 0.9 + 1.5)/3 = 3.2/3;  ∂/∂logp_t = −Â·w_t/3 = [0, 0.3, 0.5]
    out, g = _run("ppo", [[0.5, 0.9, 1.5]], [-1.0])
    assert_close(out.loss, _t(3.2 / 3), **TOL)
    assert_close(g, _t([[0.0, 0.3, 0.5]]), **TOL)
    assert_close(out.metrics["policy/clip_frac_low"], _t(1 / 3), **TOL)
    assert out.metrics["policy/clip_frac_high"].item() == 0.0
    assert out.metrics["policy/dual_clip_frac"].item() == 0.0


def test_fixture_no_clipping_inside_the_range():
    # GRPO without KL, ε = 0.2, seq-mean-token-mean, Â = 0.5, w = [1.1, 0.9]:
    #  ℓ = [−0.55, −0.45], loss = mean = −0.5; ∂/∂logp = −Â·w/2 = [−0.275, −0.225]
    out, g = _run("grpo", [[1.1, 0.9]], [0.5], kl_coef=0.0)
    assert_close(out.loss, _t(-0.5), **TOL)
    assert_close(g, _t([[-0.275, -0.225]]), **TOL)
    assert out.metrics["policy/clip_frac"].item() == 0.0


def test_fixture_dual_clip_with_negative_advantage():
    # PPO, c = 3, Â = −0.5, w = [5.0, 2.0]:
    #  t0: ℓ_clip = max(0.5·5, 0.5·1.2) = 2.5; dual: min(2.5, −Â·c = 1.5) = 1.5  (zero gradient)
    #  t1: ℓ_clip = max(1.0, 0.6) = 1.0; min(1.0, 1.5) = 1.0; ∂/∂logp = −Â·w/2 = 0.5
    #  loss = (1.5 + 1.0)/2 = 1.25
    out, g = _run("ppo", [[5.0, 2.0]], [-0.5])
    assert_close(out.loss, _t(1.25), **TOL)
    assert_close(g, _t([[0.0, 0.5]]), **TOL)
    assert_close(out.metrics["policy/dual_clip_frac"], _t(0.5), **TOL)
    # DAPO's c = 10 does not bind at w = 5: t0 stays 2.5, loss = (2.5 + 1.0)/2 = 1.75
    out, g = _run("dapo", [[5.0, 2.0]], [-0.5])
    assert_close(out.loss, _t(1.75), **TOL)
    assert_close(g, _t([[1.25, 0.5]]), **TOL)  # −Â·w/2 = [2.5/2, 1.0/2]


def test_fixture_grpo_k3_kl_in_loss():
    # GRPO, β = 0.04, k3, seq-mean-token-mean, on-policy (w = 1), Â = [1, −1], lengths [2, 1].
    #  policy: row0 mean(−1, −1) = −1, row1 = +1 → (−1 + 1)/2 = 0
    #  ρ = logp − ref: row0 [ln 2, 0], row1 [−ln 2];  k3 = e^{−ρ} + ρ − 1:
    #   k3(ln 2) = 1/2 + ln 2 − 1 = ln 2 − 1/2;  k3(0) = 0;  k3(−ln 2) = 2 − ln 2 − 1 = 1 − ln 2
    #  agg(k3) = [(ln 2 − 1/2)/2 + (1 − ln 2)]/2 = 3/8 − ln 2/4
    #  loss = 0 + 0.04·(3/8 − ln 2/4)
    logp, old, mask = _inputs([[1.0, 1.0], [1.0, 1.0]], lengths=[2, 1])
    ref = old - _t([[LN2, 0.0], [-LN2, 0.0]])
    out = C.policy_loss(
        "grpo", logprobs=logp, old_logprobs=old, advantages=_t([1.0, -1.0]), mask=mask,
        ref_logprobs=ref,
    )  # fmt: skip
    assert_close(out.metrics["loss/policy"], _t(0.0), **TOL)
    assert_close(out.metrics["loss/kl"], _t(3 / 8 - LN2 / 4), **TOL)
    assert_close(out.loss, _t(0.04 * (3 / 8 - LN2 / 4)), **TOL)
    # ∂k3/∂ρ = 1 − e^{−ρ}: row0 [1/2, 0]·(1/2)·(1/2)·β, row1 [1 − 2]·(1/2)·β; policy part
    # −Â/(B·|y|): row0 −1/4 each, row1 +1/2
    (g,) = torch.autograd.grad(out.loss, logp)
    expected = _t([[-0.25 + 0.04 * 0.5 / 4, -0.25], [0.5 + 0.04 * (-1.0) / 2, 0.0]])
    assert_close(g, expected, **TOL)


def test_fixture_dr_grpo_sum_over_max_tokens():
    # Dr. GRPO, MAX_TOKENS = 4, on-policy, Â = [0.5, −0.5], lengths [2, 1]:
    #  row sums: −0.5·2 = −1.0 and +0.5; divided by 4: −0.25, 0.125; mean over B = 2: −0.0625
    #  ∂/∂logp = −Â/(B·MAX_TOKENS) = −0.5/8 = −0.0625 (row0), +0.0625 (row1)
    out, g = _run("dr_grpo", [[1.0, 1.0], [1.0, 1.0]], [0.5, -0.5], lengths=[2, 1], max_tokens=4)
    assert_close(out.loss, _t(-0.0625), **TOL)
    assert_close(g, _t([[-0.0625, -0.0625], [0.0625, 0.0]]), **TOL)


# ----------------------------------------------------------------------------------------------
# fully masked rows


def test_fixture_fully_masked_row_is_ignored():
    # Row 0 is the DAPO fixture above (loss −5.56/3 alone); row 1 is all padding with junk ratios.
    # token-mean: (−5.56)/3 (3 valid tokens); seq-mean-token-mean: one non-empty row → −5.56/3;
    # seq-mean-token-sum: −5.56 / 1.
    for agg, expected in (
        ("token-mean", -5.56 / 3),
        ("seq-mean-token-mean", -5.56 / 3),
        ("seq-mean-token-sum", -5.56),
    ):
        out, g = _run("dapo", [[1.5, 1.0, 0.5], [50.0, 1e-3, 7.0]], [2.0, -3.0], [3, 0], agg=agg)
        assert_close(out.loss, _t(expected), **TOL)
        assert torch.equal(g[1], torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("name", C.POLICY_LOSS_NAMES)
def test_fixture_all_rows_masked_gives_zero_loss_and_gradient(name):
    # No valid token: every aggregation is 0/max(0, 1) = 0; gradients 0; metrics finite.
    logp, old, mask = _inputs([[2.0, 0.5], [3.0, 1.0]], lengths=[0, 0])
    kw = {"max_tokens": 8} if name == "dr_grpo" else {}
    out = C.policy_loss(
        name, logprobs=logp, old_logprobs=old, advantages=_t([1.0, -1.0]), mask=mask,
        ref_logprobs=old.clone(), **kw,
    )  # fmt: skip
    (g,) = torch.autograd.grad(out.loss, logp)
    assert out.loss.item() == 0.0
    assert torch.equal(g, torch.zeros_like(g))
    for key, v in out.metrics.items():
        assert torch.isfinite(v), key


# ----------------------------------------------------------------------------------------------
# GSPO on a 2-token sequence


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_fixture_gspo_two_token_sequences(name):
    # GSPO clip [1 − 3e-4, 1 + 4e-4], seq-mean-token-mean, B = 2.
    #  row0: δ = [0.2, −0.1] → log s = 0.05, s = e^0.05 ≈ 1.0513 > 1.0004, Â = +1 → clipped:
    #        ℓ = −min(s·1, 1.0004·1) = −1.0004 on both tokens; zero gradient
    #  row1: δ = [1e-4, −1e-4] (+1 padding) → log s = 0, s = 1, Â = −0.5:
    #        ℓ = −(−0.5)·1 = 0.5
    #  loss = (−1.0004 + 0.5)/2 = −0.2502
    #  row1 gradient: −s·Â/(B·|y|) = 0.5/(2·2) = 0.125 per token
    #  clip fractions: 1 of 2 sequences; 2 of 4 tokens
    w = [[math.exp(0.2), math.exp(-0.1), 1.0], [math.exp(1e-4), math.exp(-1e-4), 9.0]]
    adv = [1.0, -0.5] if name == "gspo" else [[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]
    out, g = _run(name, w, adv, lengths=[2, 2])
    assert_close(out.loss, _t(-0.2502), **TOL)
    assert_close(g, _t([[0.0, 0.0, 0.0], [0.125, 0.125, 0.0]]), **TOL)
    assert_close(out.metrics["policy/seq_clip_frac"], _t(0.5), **TOL)
    assert_close(out.metrics["policy/clip_frac"], _t(0.5), **TOL)
    # ratio metrics are over tokens: mean = (2·e^0.05 + 2·1)/4
    assert_close(out.metrics["policy/ratio_mean"], _t((math.exp(0.05) + 1) / 2), **TOL)


# ----------------------------------------------------------------------------------------------
# FIPO


def test_fixture_future_kl_three_tokens_half_decay():
    # decay_rate τ = 1 → γ = 2^(−1/1) = 0.5; F_t = M_tΔ_t + γ F_{t+1}.
    #  row0 Δ = [0.1, −0.3, 0.2]:  F2 = 0.2; F1 = −0.3 + 0.5·0.2 = −0.2; F0 = 0.1 + 0.5·(−0.2) = 0
    #  row1 Δ = [0.4, ln 12, 0.8], c = 10: ln 12 > ln 10 so M1 = 0:
    #        F2 = 0.8; F1 = 0 + 0.5·0.8 = 0.4; F0 = 0.4 + 0.5·0.4 = 0.6
    #  (a 4th, padded, position: F = 0 whatever Δ is there)
    assert C.decay_from_rate(1.0) == 0.5
    delta = _t([[0.1, -0.3, 0.2, 5.0], [0.4, math.log(12.0), 0.8, -5.0]])
    mask = torch.tensor([[True, True, True, False]] * 2)
    expected = _t([[0.0, -0.2, 0.2, 0.0], [0.6, 0.4, 0.8, 0.0]])
    for fn in (C.future_kl, future_kl_quadratic):
        F = fn(delta, mask, decay_rate=1.0, dual_clip_c=10.0)
        assert_close(F, expected, rtol=1e-12, atol=1e-15)
    # without the filter row1 keeps ln 12: F1 = ln 12 + 0.4, F0 = 0.4 + 0.5·(ln 12 + 0.4)
    F = C.future_kl(delta, mask, decay_rate=1.0, dual_clip_c=None)
    l12 = math.log(12.0)
    assert_close(F[1, :3], _t([0.4 + 0.5 * (l12 + 0.4), l12 + 0.4, 0.8]), **TOL)


def test_fixture_fipo_influence_weights_and_loss():
    # Row Δ = [0.1, −0.3, 0.2], τ = 1: F = [0, −0.2, 0.2] (previous fixture).
    #  f = clip(e^F, 1.0, 1.2) = [1, 1 (e^−0.2 ≈ 0.819), 1.2 (e^0.2 ≈ 1.221)]
    #  f = clip(e^F, 0.8, 1.2) = [1, e^−0.2, 1.2]
    delta = _t([[0.1, -0.3, 0.2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    F = C.future_kl(delta, mask, decay_rate=1.0)
    adv = torch.ones(1, 3, dtype=DT)
    f_hi = C.influence_weights(F, adv, delta, mask, influence_min=1.0, influence_max=1.2)
    f_sym = C.influence_weights(F, adv, delta, mask, influence_min=0.8, influence_max=1.2)
    assert_close(f_hi, _t([[1.0, 1.0, 1.2]]), **TOL)
    assert_close(f_sym, _t([[1.0, math.exp(-0.2), 1.2]]), **TOL)

    # FIPO loss with Â = +1 (DAPO clip [0.8, 1.28], token-mean): w = e^Δ, Ã = Â·f = [1, 1, 1.2]
    #  t0 w = e^0.1 ≈ 1.105 in range:  ℓ = −e^0.1
    #  t1 w = e^−0.3 ≈ 0.741 < 0.8 but Â > 0: ℓ = max(−e^−0.3, −0.8) = −e^−0.3
    #  t2 w = e^0.2 ≈ 1.221 < 1.28:  ℓ = −1.2·e^0.2
    #  loss = −(e^0.1 + e^−0.3 + 1.2·e^0.2)/3;  ∂/∂logp_t = −Ã_t·w_t/3 (f is detached)
    e = [math.exp(0.1), math.exp(-0.3), math.exp(0.2)]
    out, g = _run("fipo", [e], [1.0], decay_rate=1.0)
    assert_close(out.loss, _t(-(e[0] + e[1] + 1.2 * e[2]) / 3), **TOL)
    assert_close(g, _t([[-e[0] / 3, -e[1] / 3, -1.2 * e[2] / 3]]), **TOL)
    assert_close(out.metrics["fipo/weight_max"], _t(1.2), **TOL)
    assert_close(out.metrics["fipo/weight_above_1_frac"], _t(1 / 3), **TOL)
    # 7B range [0.8, 1.2]: Ã = [1, e^−0.2, 1.2] (f1 = e^−0.2 now inside the range);
    #  loss = −(e^0.1 + e^−0.2·e^−0.3 + 1.2·e^0.2)/3, gradient −Ã_t·w_t/3, f still detached
    out, g = _run("fipo", [e], [1.0], decay_rate=1.0, influence_min=0.8)
    e_f = [e[0], math.exp(-0.2) * e[1], 1.2 * e[2]]
    assert_close(out.loss, _t(-sum(e_f) / 3), **TOL)
    assert_close(g, _t([[-x / 3 for x in e_f]]), **TOL)
    # DAPO on the same input: −(e^0.1 + e^−0.3 + e^0.2)/3
    out, _ = _run("dapo", [e], [1.0])
    assert_close(out.loss, _t(-(e[0] + e[1] + e[2]) / 3), **TOL)


def test_fixture_fipo_safety_rule():
    # Δ = [ln 4, 0], τ = 1 (γ = 0.5): F = [ln 4 + 0.5·0, 0] = [ln 4, 0]; e^F = [4, 1].
    # Range [0.8, 1.2]: f = [1.2, 1.0]. Â = −1 and w0 = 4 > safety 3 → f0 = clamp(1.2, 0.8, 1.0) = 1.0
    delta = _t([[math.log(4.0), 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    F = C.future_kl(delta, mask, decay_rate=1.0)
    assert_close(F, _t([[math.log(4.0), 0.0]]), **TOL)
    adv = -torch.ones(1, 2, dtype=DT)
    kw = dict(influence_min=0.8, influence_max=1.2)
    assert_close(C.influence_weights(F, adv, delta, mask, **kw, safety_threshold=3.0),
                 _t([[1.0, 1.0]]), **TOL)  # fmt: skip
    assert_close(C.influence_weights(F, adv, delta, mask, **kw, safety_threshold=None),
                 _t([[1.2, 1.0]]), **TOL)  # fmt: skip
    # threshold 5 > w0 = 4: the rule does not fire
    assert_close(C.influence_weights(F, adv, delta, mask, **kw, safety_threshold=5.0),
                 _t([[1.2, 1.0]]), **TOL)  # fmt: skip
    # Â > 0: the rule never fires
    assert_close(C.influence_weights(F, -adv, delta, mask, **kw, safety_threshold=3.0),
                 _t([[1.2, 1.0]]), **TOL)  # fmt: skip


def test_fixture_fipo_sequence_drop_rule():
    # c = 10. Row0 Â = −1 with w = [12, 20, 1]: two tokens with Â < 0 and w > c → dropped.
    # Row1 Â = +1 on-policy, 2 tokens: ℓ = [−1, −1]. token-mean over kept tokens: −2/2 = −1.
    # (Row0's f: F uses M = 0 at w > c, so F = [0, 0, 0] and f = 1; irrelevant once dropped.)
    out, g = _run("fipo", [[12.0, 20.0, 1.0], [1.0, 1.0, 1.0]], [-1.0, 1.0], lengths=[3, 2])
    assert_close(out.loss, _t(-1.0), **TOL)
    assert out.metrics["fipo/dropped_seqs"].item() == 1.0
    assert torch.equal(g[0], torch.zeros(3, dtype=DT))
    assert_close(g[1], _t([-0.5, -0.5, 0.0]), **TOL)
    # Only one such token (w = [12, 1, 1]): kept. t0: ℓ_clip = max(12, 1.2) = 12, dual
    # min(12, 10) = 10; t1, t2: ℓ = 1. Row sums 12 and −2 over 5 tokens: (12 − 2)/5 = 2.
    out, g = _run("fipo", [[12.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [-1.0, 1.0], lengths=[3, 2])
    assert_close(out.loss, _t(2.0), **TOL)
    assert out.metrics["fipo/dropped_seqs"].item() == 0.0
    assert_close(g, _t([[0.0, 0.2, 0.2], [-0.2, -0.2, 0.0]]), **TOL)


# ----------------------------------------------------------------------------------------------
# advantages and shaping


def test_fixture_group_advantages_of_1_0_0_1():
    # r = [1, 0, 0, 1]: mean 0.5, deviations ±0.5, Σ dev² = 1
    #  ddof = 1: std = sqrt(1/3) → Â = ±0.5/(sqrt(1/3) + 1e-6)  (= ±√3/2 without eps)
    #  population std = 0.5 → Â = ±1 = sqrt((1 − p)/p) at p = 0.5
    #  Dr. GRPO: ±0.5;  RLOO: 1 − 1/3 = 2/3 and 0 − 2/3 = −2/3
    r = _t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # second group: all correct → 0
    s = [1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert_close(C.group_advantages(r, 4), _t([0.5 * x / (math.sqrt(1 / 3) + 1e-6) for x in s]),
                 **TOL)  # fmt: skip
    assert_close(C.group_advantages(r, 4, eps=0.0)[:4], _t([math.sqrt(3) / 2 * x for x in s[:4]]),
                 **TOL)  # fmt: skip
    assert_close(C.group_centered_advantages(r, 4), _t([0.5 * x for x in s]), **TOL)
    assert_close(C.rloo_advantages(r, 4), _t([2 / 3 * x for x in s]), **TOL)
    # group size 2: [1, 0] → ±0.5/(sqrt(0.5) + 1e-6)  (ddof = 1: var = 0.5)
    assert_close(C.group_advantages(r[:2], 2), _t([0.5, -0.5]) / (math.sqrt(0.5) + 1e-6), **TOL)


def test_fixture_sppo_and_remax_advantages():
    # SPPO: A = R − σ(z): z = 0 → σ = 1/2; z = ln 3 → σ = 3/4
    assert_close(C.sppo_advantages(_t([1.0, 0.0]), _t([0.0, math.log(3.0)])), _t([0.5, -0.75]),
                 **TOL)  # fmt: skip
    # ReMax: A = r − r_greedy
    assert_close(C.remax_advantages(_t([1.0, 0.0, 1.0]), _t([1.0, 1.0, 0.0])), _t([0.0, -1.0, 1.0]))


def test_fixture_soft_overlong_penalty():
    # L_max = 20, L_cache = 4 → start = 16: 0 up to 16, (16 − |y|)/4 in (16, 20], −1 beyond 20.
    #  |y| = 10 → 0; 16 → 0; 17 → −1/4; 18 → −1/2; 19 → −3/4; 20 → −1; 21 → −1; 25 → −1
    lengths = torch.tensor([10, 16, 17, 18, 19, 20, 21, 25])
    expected = [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    out = C.soft_overlong_penalty(lengths, 20, 4)
    assert out.tolist() == expected  # all exactly representable
    assert C.soft_overlong_penalty(lengths, 20, 4, factor=0.5).tolist() == [x / 2 for x in expected]


def test_fixture_kl_estimators_at_rho_ln2():
    # ρ = ln 2: k1 = ln 2; k2 = (ln 2)²/2; k3 = e^{−ln 2} + ln 2 − 1 = ln 2 − 1/2
    logp, ref = _t([[LN2 - 1.0]]), _t([[-1.0]])
    m = torch.ones(1, 1, dtype=torch.bool)
    assert_close(C.kl_estimate(logp, ref, m, "k1"), _t([[LN2]]), **TOL)
    assert_close(C.kl_estimate(logp, ref, m, "k2"), _t([[LN2**2 / 2]]), **TOL)
    assert_close(C.kl_estimate(logp, ref, m, "k3"), _t([[LN2 - 0.5]]), **TOL)


# ----------------------------------------------------------------------------------------------
# error messages


def _call(name="dapo", adv=None, mask=None, **kw):
    logp = torch.zeros(2, 3, dtype=DT)
    return C.policy_loss(
        name,
        logprobs=logp,
        old_logprobs=logp.clone(),
        advantages=torch.zeros(2, dtype=DT) if adv is None else adv,
        mask=torch.ones(2, 3, dtype=torch.bool) if mask is None else mask,
        **kw,
    )


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("gpso", "gspo"), ("gspotoken", "gspo_token"), ("drgrpo", "dr_grpo"), ("fipo_", "fipo")],
)
def test_error_unknown_loss_name_suggests_closest(typo, suggestion):
    with pytest.raises(
        ValueError, match=rf"unknown policy loss '{typo}'; did you mean '{suggestion}'"
    ):
        _call(typo)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("clip_hgh", "clip_high"), ("kl_coeff", "kl_coef"), ("max_token", "max_tokens"),
     ("dual_clip", "dual_clip_c")],
)  # fmt: skip
def test_error_unknown_hparam_suggests_closest_key(typo, suggestion):
    with pytest.raises(
        TypeError, match=rf"unknown hyperparameter '{typo}'.*did you mean '{suggestion}'"
    ):
        _call("dapo", **{typo: 0.3})


def test_error_dr_grpo_without_max_tokens():
    # caught when the config is resolved (before any tensor exists), naming the loss
    with pytest.raises(ValueError, match=r"'dr_grpo'.*needs max_tokens.*MAX_TOKENS"):
        C.resolve_policy_loss_config("dr_grpo")
    with pytest.raises(ValueError, match=r"'dr_grpo'.*needs max_tokens"):
        _call("dr_grpo")
    with pytest.raises(ValueError, match="max_tokens"):
        C.aggregate(
            torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "seq-mean-token-sum-norm"
        )


def test_error_grpo_without_ref_logprobs_explains_kl_coef():
    with pytest.raises(ValueError, match=r"kl_coef=0\.04 needs ref_logprobs.*kl_coef=0"):
        _call("grpo")
    _call("grpo", kl_coef=0.0)  # the advertised way out works


@pytest.mark.parametrize("key", ["decay_rate", "influence_min", "influence_max",
                                 "safety_threshold", "drop_dual_clipped_sequences"])  # fmt: skip
@pytest.mark.parametrize("name", ["dapo", "grpo", "gspo"])
def test_error_fipo_only_hparams_on_other_losses(name, key):
    value = True if key == "drop_dual_clipped_sequences" else 2.0
    with pytest.raises(TypeError, match=rf"{key} only apply to FIPO"):
        _call(name, **{key: value})
    _call("fipo", **{key: value})  # accepted where it belongs


@pytest.mark.parametrize("dtype", [torch.float64, torch.long, torch.uint8])
def test_error_non_bool_mask(dtype):
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        _call("dapo", mask=torch.ones(2, 3, dtype=dtype))
    with pytest.raises(TypeError, match="bool"):
        C.token_log_ratio(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=dtype))


def test_error_gspo_with_token_advantages():
    with pytest.raises(ValueError, match=r"gspo.*\[B\].*gspo_token"):
        _call("gspo", adv=torch.zeros(2, 3, dtype=DT))
    _call("gspo_token", adv=torch.zeros(2, 3, dtype=DT))  # the suggested alternative works
