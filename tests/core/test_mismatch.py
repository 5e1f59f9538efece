"""Train–inference mismatch weights (truncated / masked importance sampling) and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C
from reference import mismatch_weights_ref

DT = torch.float64


def _log(x):
    return torch.tensor(x, dtype=DT).log()


def _fixture():
    """Row 0: π_old = [.5, .2, .9], μ = [.25, .4, .3] → ρ_t = [2, 0.5, 3], Π ρ = 3.
    Row 1: π_old = [.3, .6, pad], μ = [.2, .6, pad] → ρ_t = [1.5, 1], Π ρ = 1.5."""
    old = torch.stack([_log([0.5, 0.2, 0.9]), _log([0.3, 0.6, 1.0])])  # [2, 3]
    mu = torch.stack([_log([0.25, 0.4, 0.3]), _log([0.2, 0.6, 1.0])])
    mu[1, 2] = -math.inf  # padding may hold anything
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return old, mu, mask


@pytest.mark.parametrize(
    ("level", "mode", "expected"),
    [
        # cap C = 2.5
        ("token", "truncate", [[2.0, 0.5, 2.5], [1.5, 1.0, 0.0]]),  # min(ρ_t, 2.5)
        ("token", "mask", [[2.0, 0.5, 0.0], [1.5, 1.0, 0.0]]),  # ρ_t = 3 > 2.5 → 0
        ("sequence", "truncate", [[2.5, 2.5, 2.5], [1.5, 1.5, 0.0]]),  # min(3, 2.5), min(1.5, 2.5)
        ("sequence", "mask", [[0.0, 0.0, 0.0], [1.5, 1.5, 0.0]]),  # row 0's Π ρ = 3 > 2.5: dropped
    ],
)
def test_fixture_weights_by_hand(level, mode, expected):
    old, mu, mask = _fixture()
    w = C.mismatch_weights(old, mu, mask, level=level, mode=mode, cap=2.5)
    assert_close(w, torch.tensor(expected, dtype=DT))
    assert_close(w, mismatch_weights_ref(old, mu, mask, level=level, mode=mode, cap=2.5))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_weights_match_the_reference_on_random_inputs(level, mode):
    gen = torch.Generator().manual_seed(3)
    B, T = 7, 9
    old = -torch.rand(B, T, generator=gen, dtype=DT) * 3
    mu = old + torch.randn(B, T, generator=gen, dtype=DT) * 0.3
    lengths = torch.tensor([0, 1, 2, 5, 9, 9, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mu = torch.where(mask, mu, torch.full_like(mu, -1e30))  # padding garbage
    for cap in (0.8, 1.2, 3.0):
        w = C.mismatch_weights(old, mu, mask, level=level, mode=mode, cap=cap)
        assert_close(w, mismatch_weights_ref(old, mu, mask, level=level, mode=mode, cap=cap))


def test_sequence_ratio_overflow_gives_cap_or_zero_never_inf_or_nan():
    old = torch.zeros(2, 400, dtype=torch.float32)
    mu = torch.full((2, 400), -5.0)  # Σ log ρ = 2000: exp overflows float32 (and float64)
    mask = torch.ones(2, 400, dtype=torch.bool)
    trunc = C.mismatch_weights(old, mu, mask, level="sequence", mode="truncate", cap=2.0)
    dropped = C.mismatch_weights(old, mu, mask, level="sequence", mode="mask", cap=2.0)
    assert torch.equal(trunc, torch.full_like(trunc, 2.0))
    assert torch.equal(dropped, torch.zeros_like(dropped))


def test_identical_likelihoods_give_unit_weights_and_neutral_metrics():
    old, _, mask = _fixture()
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            w = C.mismatch_weights(old, old, mask, level=level, mode=mode, cap=1.0)
            assert_close(w, mask.to(DT))  # ρ = 1 ≤ C = 1 everywhere
    m = C.mismatch_metrics(old, old, mask, cap=2.0)
    assert m["mismatch/ratio_mean"] == 1 and m["mismatch/kl"] == 0
    assert m["mismatch/token_over_cap_frac"] == 0 and m["mismatch/seq_over_cap_frac"] == 0


def test_fixture_metrics_by_hand():
    old, mu, mask = _fixture()
    m = C.mismatch_metrics(old, mu, mask, cap=2.5)
    # valid ρ_t: 2, 0.5, 3, 1.5, 1 → mean 8/5; log μ − log π_old = −log ρ_t
    assert_close(m["mismatch/ratio_mean"], torch.tensor(1.6, dtype=DT))
    assert_close(m["mismatch/ratio_min"], torch.tensor(0.5, dtype=DT))
    assert_close(m["mismatch/ratio_max"], torch.tensor(3.0, dtype=DT))
    kl = -(math.log(2) + math.log(0.5) + math.log(3) + math.log(1.5) + 0.0) / 5
    assert_close(m["mismatch/kl"], torch.tensor(kl, dtype=DT))
    # |Σ log ρ| per row: log 3, log 1.5
    assert_close(
        m["mismatch/seq_log_ratio_abs"], torch.tensor((math.log(3) + math.log(1.5)) / 2, dtype=DT)
    )
    assert_close(m["mismatch/token_over_cap_frac"], torch.tensor(0.2, dtype=DT))  # ρ = 3 only
    assert_close(m["mismatch/seq_over_cap_frac"], torch.tensor(0.5, dtype=DT))  # row 0 only


def test_policy_loss_scales_each_token_term_and_keeps_the_normaliser():
    """loss = Σ w_t ℓ_t / Σ m (token-mean): a zero weight removes the token's gradient only."""
    old, mu, mask = _fixture()
    logprobs = (old + 0.01).clone().requires_grad_(True)  # ratios ≈ 1.01: inside the clip range
    adv = torch.tensor([1.0, -2.0], dtype=DT)
    w = C.mismatch_weights(old, mu, mask, level="token", mode="mask", cap=2.5)
    out = C.policy_loss("dapo", logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask,
                        is_weights=w)  # fmt: skip
    ratio = torch.exp(logprobs - old)
    per_token = -adv[:, None] * ratio  # unclipped: −A·w_t
    expected = (w * per_token)[mask].sum() / mask.sum()
    assert_close(out.loss, expected)
    out.loss.backward()
    assert logprobs.grad[0, 2] == 0  # the masked-out token (ρ = 3 > 2.5)
    assert logprobs.grad[0, 0] != 0
    plain = C.policy_loss("dapo", logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask,
                          is_weights=mask.to(DT))  # fmt: skip
    unweighted = C.policy_loss("dapo", logprobs=logprobs, old_logprobs=old, advantages=adv,
                               mask=mask)  # fmt: skip
    assert_close(plain.loss, unweighted.loss)


def test_bad_arguments_are_named():
    old, mu, mask = _fixture()
    with pytest.raises(ValueError, match="mode"):
        C.mismatch_weights(old, mu, mask, mode="clip")
    with pytest.raises(ValueError, match="level"):
        C.mismatch_weights(old, mu, mask, level="group")
    with pytest.raises(ValueError, match="cap"):
        C.mismatch_weights(old, mu, mask, cap=0.0)
    with pytest.raises(ValueError, match="is_weights"):
        C.policy_loss("dapo", logprobs=old, old_logprobs=old, advantages=torch.zeros(2, dtype=DT),
                      mask=mask, is_weights=torch.ones(2, dtype=DT))  # fmt: skip
