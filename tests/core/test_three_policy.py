"""The three-policy loss (``C.decoupled_policy_loss``) against its slow reference.

μ sampled the tokens (an asynchronous rollout worker, k versions old), π_prox is the trainer's
policy when the step began, π_θ is being optimised: the clip acts on π_θ / π_prox and a
truncated (or masked) importance weight on π_prox / μ, per token for token ratios and per
length-normalised sequence for GSPO. Values and gradients in float64 with ragged masks and
garbage in the padding; every case checks that the weights it relies on really vary.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference as R
import seqrl.core as C

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
NAMES = list(C.POLICY_LOSS_NAMES)


def _batch(seed: int, name: str, adv_dim: int, B: int = 8, T: int = 10):
    """(logp, prox, behaviour, adv, mask, ref): ragged rows (one full, one of length 1, one
    empty), μ well away from π_prox, π_θ near π_prox (closer for the sequence-level losses, so
    that GSPO's narrow clip range is straddled rather than always exceeded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [T, 1, 0, *torch.randint(2, T + 1, (B - 3,), generator=g).tolist()]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    prox = -(torch.randn(B, T, generator=g, dtype=DT).abs() * 2.0) - 0.05
    shift = torch.tensor([-0.6, 0.5, 0.0, -0.3, 0.2, -0.8, 0.1, -0.1], dtype=DT)[:B, None]
    behaviour = prox + shift + 0.4 * torch.randn(B, T, generator=g, dtype=DT)
    if R.POLICY_LOSS_PRESETS[name]["ratio_level"] == "token":
        logp = prox + 0.3 * torch.randn(B, T, generator=g, dtype=DT)
    else:
        offsets = torch.tensor([-1e-3, 2e-4, -2e-4, 6e-4, 1e-4, -5e-4, 0.0, 1.5e-4], dtype=DT)
        logp = prox + offsets[torch.arange(B) % 8][:, None]
    garbage = torch.randn(B, T, generator=g, dtype=DT) * 5.0
    logp, prox = torch.where(mask, logp, garbage), torch.where(mask, prox, -garbage)
    behaviour = torch.where(mask, behaviour, torch.full_like(behaviour, -1e30))
    sign = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=DT)[:B]
    if adv_dim == 1:
        adv = sign * (torch.randn(B, generator=g, dtype=DT).abs() + 0.1)  # [B]
    else:
        adv = sign[:, None] * (torch.randn(B, T, generator=g, dtype=DT).abs() + 0.05)  # [B, T]
    ref = prox + 0.2 * torch.randn(B, T, generator=g, dtype=DT)
    return logp, prox, behaviour, adv, mask, ref


def _kwargs(name: str) -> dict:
    return {"max_tokens": 20} if name == "dr_grpo" else {}


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


CASES = [
    (name, correction, adv_dim)
    for name in NAMES
    for correction in ("truncate", "mask", "none")
    for adv_dim in (1, 2)
    if not (name == "gspo" and adv_dim == 2)  # GSPO takes one advantage per sequence
]


@pytest.mark.parametrize(("name", "correction", "adv_dim"), CASES)
def test_three_policy_loss_matches_the_reference(name, correction, adv_dim):
    logp, prox, mu, adv, mask, ref = _batch(7, name, adv_dim)
    ref = ref if name == "grpo" else None
    cfg = C.resolve_policy_loss_config(name, **_kwargs(name))
    fast_x, slow_x = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    cap = 1.5
    out = C.decoupled_policy_loss(
        cfg,
        logprobs=fast_x,
        prox_logprobs=prox,
        behaviour_logprobs=mu,
        advantages=adv,
        mask=mask,
        correction=correction,
        cap=cap,
        ref_logprobs=ref,
    )
    slow = R.ref_decoupled_policy_loss(
        name, slow_x, prox, mu, adv, mask, correction=correction, cap=cap, ref_logprobs=ref,
        **_kwargs(name),
    )  # fmt: skip
    torch.testing.assert_close(out.loss, slow, **TOL)
    torch.testing.assert_close(_grad(out.loss, fast_x), _grad(slow, slow_x), **TOL)
    # the weights really vary: some tokens (rows) at or above the cap, some below
    level = C.behaviour_level(cfg.ratio_level)
    log_rho = C.mismatch_log_ratio(prox, mu, mask, level=level)
    rho = log_rho.exp() if level == "token" else log_rho.exp()[:, None].expand_as(mask)
    over = (rho > cap) & mask
    assert over.any() and (~over & mask).any()
    if correction != "none":
        frac = out.metrics["mismatch/weight_capped_frac"]
        assert abs(float(frac) - over.sum().item() / mask.sum().item()) < 1e-12


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_mean"])
@pytest.mark.parametrize("name", ["dapo", "gspo", "gspo_token", "fipo"])
def test_every_level_can_be_chosen_explicitly(name, level):
    logp, prox, mu, adv, mask, _ = _batch(11, name, 1)
    cfg = C.resolve_policy_loss_config(name)
    fast_x, slow_x = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    out = C.decoupled_policy_loss(
        cfg, logprobs=fast_x, prox_logprobs=prox, behaviour_logprobs=mu, advantages=adv,
        mask=mask, correction="truncate", level=level, cap=1.2,
    )  # fmt: skip
    slow = R.ref_decoupled_policy_loss(name, slow_x, prox, mu, adv, mask, level=level, cap=1.2)
    torch.testing.assert_close(out.loss, slow, **TOL)
    torch.testing.assert_close(_grad(out.loss, fast_x), _grad(slow, slow_x), **TOL)


@pytest.mark.parametrize("correction", ["truncate", "mask"])
@pytest.mark.parametrize("name", NAMES)
def test_with_mu_equal_to_prox_it_is_the_two_policy_loss_exactly(name, correction):
    """k = 0 without a train–inference gap: ρ = 1, ω = 1, and the loss, its gradient and its
    metrics are bit for bit those of ``clipped_policy_loss``."""
    logp, prox, _, adv, mask, ref = _batch(3, name, 1)
    ref = ref if name == "grpo" else None
    cfg = C.resolve_policy_loss_config(name, **_kwargs(name))
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    three = C.decoupled_policy_loss(
        cfg, logprobs=a, prox_logprobs=prox, behaviour_logprobs=prox.clone(), advantages=adv,
        mask=mask, correction=correction, cap=1.0, ref_logprobs=ref,
    )  # fmt: skip
    two = C.clipped_policy_loss(
        cfg, logprobs=b, old_logprobs=prox, advantages=adv, mask=mask, ref_logprobs=ref
    )
    assert torch.equal(three.loss, two.loss)
    assert torch.equal(_grad(three.loss, a), _grad(two.loss, b))
    extra = {"mismatch/weight_mean", "mismatch/weight_capped_frac"}
    assert three.metrics.keys() == two.metrics.keys() | extra
    assert three.metrics["mismatch/weight_mean"] == 1.0
    assert three.metrics["mismatch/weight_capped_frac"] == 0.0
    for key in two.metrics:
        assert torch.equal(three.metrics[key], two.metrics[key]), key


def test_fipo_future_kl_is_taken_against_prox_not_mu():
    """On the first minibatch π_θ = π_prox: every FIPO weight is 1 and nothing is clipped or
    dropped, however stale the samples are (their age is in ω alone)."""
    _, prox, mu, adv, mask, _ = _batch(5, "fipo", 2)
    cfg = C.resolve_policy_loss_config("fipo")
    out = C.decoupled_policy_loss(
        cfg, logprobs=prox.clone(), prox_logprobs=prox, behaviour_logprobs=mu, advantages=adv,
        mask=mask,
    )  # fmt: skip
    assert out.metrics["fipo/weight_mean"] == 1.0 and out.metrics["fipo/weight_max"] == 1.0
    assert out.metrics["policy/clip_frac"] == 0 and out.metrics["fipo/dropped_seqs"] == 0
    dapo = C.decoupled_policy_loss(
        C.resolve_policy_loss_config("dapo"), logprobs=prox.clone(), prox_logprobs=prox,
        behaviour_logprobs=mu, advantages=adv, mask=mask,
    )  # fmt: skip
    torch.testing.assert_close(out.loss, dapo.loss, rtol=0, atol=0)


def test_sequence_mean_weights_by_hand():
    """Row 0: ρ_t = [2, 0.5, 3] → (Π ρ)^(1/3) = 3^(1/3); row 1: ρ_t = [1.5, 1] → √1.5."""
    log = lambda x: torch.tensor(x, dtype=DT).log()  # noqa: E731
    prox = torch.stack([log([0.5, 0.2, 0.9]), log([0.3, 0.6, 1.0])])  # [2, 3]
    mu = torch.stack([log([0.25, 0.4, 0.3]), log([0.2, 0.6, 1.0])])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    a, b = 3 ** (1 / 3), math.sqrt(1.5)
    w = C.mismatch_weights(prox, mu, mask, level="sequence_mean", mode="truncate", cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[a, a, a], [b, b, 0.0]], dtype=DT))
    w = C.mismatch_weights(prox, mu, mask, level="sequence_mean", mode="mask", cap=1.3)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [b, b, 0.0]], dtype=DT))
    for mode, cap in (("truncate", 1.3), ("mask", 2.5)):
        torch.testing.assert_close(
            C.mismatch_weights(prox, mu, mask, level="sequence_mean", mode=mode, cap=cap),
            R.mismatch_weights_ref(prox, mu, mask, level="sequence_mean", mode=mode, cap=cap),
        )


def test_matching_levels_and_bad_arguments():
    assert [C.behaviour_level(r) for r in ("token", "sequence", "sequence_token")] == [
        "token",
        "sequence_mean",
        "sequence_mean",
    ]
    with pytest.raises(ValueError, match="ratio_level"):
        C.behaviour_level("tokens")
    logp, prox, mu, adv, mask, _ = _batch(1, "dapo", 1)
    cfg = C.resolve_policy_loss_config("dapo")
    with pytest.raises(ValueError, match="correction must be"):
        C.decoupled_policy_loss(
            cfg, logprobs=logp, prox_logprobs=prox, behaviour_logprobs=mu, advantages=adv,
            mask=mask, correction="clip",
        )  # fmt: skip
