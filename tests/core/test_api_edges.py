"""Edges of the public API: normaliser plumbing, error hints, dtype and degenerate settings."""

import pytest
import torch

import seqrl.core as C
from reference import future_kl_quadratic

F64 = torch.float64


def _batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=F64)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.tensor([9, 1, 5, 9, 3, 7])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=F64)
    return logp, old, adv, mask


@pytest.mark.parametrize("name", ["dapo", "gspo", "grpo", "dr_grpo", "fipo"])
def test_policy_loss_accepts_both_normalizers_and_splits_exactly(name):
    logp, old, adv, mask = _batch()
    kw = {"max_tokens": 16} if name == "dr_grpo" else {}
    if name == "grpo":
        kw["kl_coef"] = 0.0
    if name == "fipo":
        kw["drop_dual_clipped_sequences"] = False
    full = C.policy_loss(name, logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, **kw)
    (g_full,) = torch.autograd.grad(full.loss, logp)
    tt, ts = C.normalizers(mask)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        part = C.policy_loss(
            name,
            logprobs=logp[rows],
            old_logprobs=old[rows],
            advantages=adv[rows],
            mask=mask[rows],
            total_tokens=tt,
            total_sequences=ts,
            **kw,
        )
        total = total + part.loss
    (g_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full.loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g_split, g_full, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("loss_agg_mode", "'agg'"),
        ("clip_ratio_c", "'dual_clip_c'"),
        ("beta", "'kl_coef'"),
        ("epsilon_high", "'clip_high'"),
        ("clip_hihg", "'clip_high'"),
        ("AGG", "'agg'"),
    ],
)
def test_unknown_hyperparameter_names_the_seqrl_key(key, hint):
    logp, old, adv, mask = _batch()
    with pytest.raises(TypeError, match=hint):
        C.policy_loss(
            "dapo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, **{key: 1}
        )


def test_unknown_name_is_matched_case_insensitively():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="did you mean 'gspo'"):
        C.policy_loss("GSPO", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)


def test_reported_kl_with_zero_coef_cannot_poison_the_loss():
    logp, old, adv, mask = _batch()
    ref = logp.detach().clone()
    ref[0, 0] = float("inf")  # a broken reference on one valid token
    out = C.policy_loss(
        "dapo", logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref
    )
    assert torch.isfinite(out.loss)
    assert not torch.isfinite(out.metrics["loss/kl"])  # still reported, so the user sees it
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(grad).all()


def test_future_kl_and_the_papers_method_handle_vanishing_decay():
    # decay_rate 1e-6 → γ = 2^(−1e6) = 0.0 in float: F_t = M_t Δ_t exactly (0^0 = 1)
    x = torch.randn(2, 7, dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    for fn in (C.future_kl, future_kl_quadratic):
        torch.testing.assert_close(fn(x, mask, decay_rate=1e-6), x, rtol=0, atol=0)


def test_overlong_penalty_keeps_float_dtype():
    lengths = torch.tensor([1.0, 15.0, 20.0], dtype=F64)
    out = C.soft_overlong_penalty(lengths, 20, 8)
    assert out.dtype == F64
    # 12 = 20 − 8 is where the penalty starts: (12 − 15)/8 = −0.375; 20 → −1
    torch.testing.assert_close(out, torch.tensor([0.0, -0.375, -1.0], dtype=F64))


@pytest.mark.parametrize("name", ["dapo", "grpo"])
def test_a_minibatch_without_valid_tokens_has_loss_zero_not_nan(name):
    # e.g. every response of a minibatch truncated under DAPO's overlong filtering
    logp, old, adv, mask = _batch()
    empty = torch.zeros_like(mask)
    tt, ts = C.normalizers(empty)
    assert (tt.item(), ts.item()) == (1, 1)  # at least 1, like aggregate's local normalisers
    out = C.policy_loss(
        name,
        logprobs=logp,
        old_logprobs=old,
        advantages=adv,
        mask=empty,
        total_tokens=tt,
        total_sequences=ts,
        kl_coef=0.0,
    )
    assert out.loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.equal(grad, torch.zeros_like(grad))
