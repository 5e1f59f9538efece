"""Spec §6 invariants 15–24 (SPPO, FIPO), 28–30 (DAPO pieces), 32 (GAE) and 33 (ReMax).

Every check runs in float64 on CPU against small local reference loops written here (not the
library's own helpers), with tight tolerances. Invariant 16 (critic input invariance) needs a
model: it runs a real tiny Qwen2 critic (seqrl.models.critic) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C
from reference import future_kl_quadratic

DT = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
EXACT = {"rtol": 0.0, "atol": 0.0}


# ---------------------------------------------------------------------------------------------
# helpers (local references, deliberately independent of the implementation)
# ---------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    """Contiguous (right-padded) masks of the given lengths: [B, T] bool."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def gapped_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """Random masks with gaps (non-contiguous valid tokens), plus empty / full / single rows."""
    m = torch.rand(B, T, generator=gen(seed)) < 0.65
    m[0] = False  # empty row
    m[1] = True  # full row
    m[2] = False
    m[2, T // 2] = True  # single valid token in the middle
    m[3] = False
    m[3, ::3] = True  # regular gaps
    return m


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen(seed), dtype=DT)


def naive_future_kl(delta, mask, gamma, c=None):
    """O(L²) double loop: F_t = Σ_{k≥t} M_k γ^(k−t) Δ_k, M_k = mask_k ∧ (Δ_k ≤ log c); 0 off-mask."""
    d, m = delta.tolist(), mask.tolist()
    log_c = None if c is None else math.log(c)
    out = []
    for drow, mrow in zip(d, m, strict=True):
        L = len(drow)
        row = []
        for t in range(L):
            if not mrow[t]:
                row.append(0.0)
                continue
            s = 0.0
            for k in range(t, L):
                if mrow[k] and (log_c is None or drow[k] <= log_c):
                    s += gamma ** (k - t) * drow[k]
            row.append(s)
        out.append(row)
    return torch.tensor(out, dtype=DT)


def scan_future_kl(delta, mask, gamma, c=None):
    """Reverse scan F_t = M_tΔ_t + γF_{t+1} (padding has M = 0 but still counts in distance)."""
    d, m = delta.tolist(), mask.tolist()
    log_c = None if c is None else math.log(c)
    out = []
    for drow, mrow in zip(d, m, strict=True):
        L = len(drow)
        row = [0.0] * L
        acc = 0.0
        for t in reversed(range(L)):
            keep = mrow[t] and (log_c is None or drow[t] <= log_c)
            acc = (drow[t] if keep else 0.0) + gamma * acc
            row[t] = acc if mrow[t] else 0.0
        out.append(row)
    return torch.tensor(out, dtype=DT)


def gae_reference(rewards, values, mask, gamma, lam):
    """GAE over the valid tokens only (next state = next valid token, V after the last = 0)."""
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    adv = [[0.0] * len(row) for row in m]
    ret = [[0.0] * len(row) for row in m]
    for b, mrow in enumerate(m):
        idx = [t for t, ok in enumerate(mrow) if ok]
        running, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = r[b][t] + gamma * next_v - v[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + v[b][t]
            next_v = v[b][t]
    return torch.tensor(adv, dtype=DT), torch.tensor(ret, dtype=DT)


def td_reference(rewards, values, mask, gamma):
    """δ_t = r_t + γ V(next valid) − V_t on valid tokens, 0 elsewhere."""
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    out = [[0.0] * len(row) for row in m]
    for b, mrow in enumerate(m):
        idx = [t for t, ok in enumerate(mrow) if ok]
        for j, t in enumerate(idx):
            nv = v[b][idx[j + 1]] if j + 1 < len(idx) else 0.0
            out[b][t] = r[b][t] + gamma * nv - v[b][t]
    return torch.tensor(out, dtype=DT)


def ref_influence(F, adv, log_ratio, mask, lo, hi, safety):
    """f = clip(exp F, lo, hi); where Â<0 and w > safety: clamp(f, 0.8, 1.0); 1 off-mask."""
    f = torch.exp(F)
    if lo is not None:
        f = torch.maximum(f, torch.full_like(f, lo))
    if hi is not None:
        f = torch.minimum(f, torch.full_like(f, hi))
    if safety is not None:
        risky = mask & (adv < 0) & (torch.exp(log_ratio) > safety)
        f = torch.where(risky, f.clamp(0.8, 1.0), f)
    return torch.where(mask, f, torch.ones_like(f))


def loss_and_grad(name, logprobs, old, adv, mask, **kw):
    lp = logprobs.detach().clone().requires_grad_(True)
    out = C.policy_loss(name, logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, **kw)
    (grad,) = torch.autograd.grad(out.loss, lp)
    return out, grad


# ---------------------------------------------------------------------------------------------
# SPPO (15–18)
# ---------------------------------------------------------------------------------------------


def test_inv15_sppo_advantage_is_reward_minus_sigmoid_bounded_and_signed():
    B = 64
    z = randn(B, seed=1, scale=3.0).clamp(-8, 8)
    R = (torch.rand(B, generator=gen(2)) < 0.5).to(DT)
    A = C.sppo_advantages(R, z)
    expected = R - 1.0 / (1.0 + torch.exp(-z))
    assert_close(A, expected, **TIGHT)
    assert_close(A, R - torch.sigmoid(z), **EXACT)
    assert torch.equal(A > 0, R == 1.0)  # A > 0 ⇔ R = 1
    assert bool((A.abs() < 1).all())
    # the critic is not trained through the advantage
    zg = z.clone().requires_grad_(True)
    assert not C.sppo_advantages(R, zg).requires_grad


def test_sppo_advantage_with_shaped_rewards_baselines_the_outcome_part():
    """R = r_c or r_w (+ extras): the baseline is the critic's expected outcome reward
    r_w + (r_c − r_w)·V, so E[A | prompt] = extras when V is the prompt's success rate."""
    z = randn(6, seed=4, scale=2.0)
    p = torch.sigmoid(z)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=DT)
    for r_c, r_w in ((1.0, -1.0), (1.0, 0.0), (2.0, 0.5)):
        R = r_w + (r_c - r_w) * correct
        A = C.sppo_advantages(R, z, correct_reward=r_c, incorrect_reward=r_w)
        assert_close(A, (r_c - r_w) * (correct - p), **TIGHT)  # the paper's A, rescaled
        expected = p * (r_c - (r_w + (r_c - r_w) * p)) + (1 - p) * (r_w - (r_w + (r_c - r_w) * p))
        assert_close(expected, torch.zeros_like(p), **TIGHT)  # an unbiased baseline
    # extra shaping (e.g. an overlong penalty) passes through the advantage unbaselined
    penalty = torch.tensor([0.0, -0.5, 0.0, 0.0, -0.25, 0.0], dtype=DT)
    A = C.sppo_advantages(2 * correct - 1 + penalty, z, incorrect_reward=-1.0)
    assert_close(A, 2 * (correct - p) + penalty, **TIGHT)
    assert torch.equal(
        C.sppo_advantages(correct, z, incorrect_reward=0.0), C.sppo_advantages(correct, z)
    )


def test_inv15_sppo_advantage_independent_of_response_length():
    """The same (R, z) gives the same A whatever the response length; every token gets it."""
    R = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DT)
    z = torch.tensor([0.3, 0.3, -1.2, -1.2], dtype=DT)
    mask = ragged_mask([2, 9, 1, 7], 9)
    A = C.sppo_advantages(R, z)
    assert A[0] == A[1] and A[2] == A[3]
    tok = C.broadcast_to_tokens(A, mask)
    for i in range(4):
        assert torch.equal(tok[i][mask[i]], A[i].expand(int(mask[i].sum())))
    # on-policy SPPO gradient per token = −A / N_tokens for every valid token of every length
    lp = randn(4, 9, seed=3) - 2.0
    out, grad = loss_and_grad("sppo", lp, lp.clone(), A, mask)
    n = mask.sum().to(DT)
    assert_close(grad, torch.where(mask, -A[:, None] / n, torch.zeros_like(lp)), **TIGHT)
    assert_close(out.loss, -(tok.sum() / n), **TIGHT)


def _critic_batch(tok, prompts, responses):
    """A RolloutBatch (G = 1) of the given prompts and response strings, as the sampler lays out."""
    from seqrl.rollout import RolloutBatch, response_mask_from_tokens

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    resp = [[*tok.encode(r, add_special_tokens=False), tok.eos_token_id] for r in responses]
    T = max(map(len, resp))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in resp])
    mask, truncated = response_mask_from_tokens(ids, tok.eos_token_id)
    return RolloutBatch(
        enc["input_ids"],
        enc["attention_mask"].bool(),
        ids,
        mask,
        torch.zeros(ids.shape),
        truncated,
        1,
    )


@pytest.mark.parametrize("spec", ["policy", "builtin:nano"])
def test_inv16_critic_input_invariance_to_response_tokens_and_left_padding(spec):
    """V(s_p) is read from a prompt-only forward: responses never reach it, padding does not move it."""
    from seqrl.models import build_tiny_model, build_tokenizer
    from seqrl.models.critic import build_critic
    from seqrl.train.forward import batch_values, prompt_value_logits

    tok = build_tokenizer()
    policy = build_tiny_model(tok, size="nano", seed=3)
    critic = build_critic(spec, policy, tok, seed=5).to(DT)
    prompts = ["12+345=", "7+8="]
    a = _critic_batch(tok, prompts, ["357", "15"])
    b = _critic_batch(tok, prompts, ["9999999", ""])  # other responses, other lengths
    za, zb = batch_values(critic, a, "scalar", 8), batch_values(critic, b, "scalar", 8)
    assert torch.equal(za, zb)
    # left padding: the short prompt alone (no padding) vs next to a long prompt (4 pad tokens)
    alone = tok(["7+8="], return_tensors="pt", add_special_tokens=False)
    z_alone = prompt_value_logits(critic, alone["input_ids"], alone["attention_mask"].bool())
    assert a.prompt_mask[1].sum() < a.prompt_mask.shape[1]  # it really is left-padded in a
    assert_close(za[1:].double(), z_alone.double(), rtol=0, atol=1e-6)
    # the prompt does matter (the test can fail): a different prompt gives a different value
    c = _critic_batch(tok, ["12+345=", "8+8="], ["357", "15"])
    assert not torch.equal(batch_values(critic, c, "scalar", 8)[1], za[1])
    # token critic: V(s_t) sees y_<t only, so changing token k leaves V(s_t≤k) unchanged
    d = _critic_batch(tok, prompts, ["351", "19"])  # token 2 of row 0, token 1 of row 1 changed
    vd, va = batch_values(critic, d, "token", 8), batch_values(critic, a, "token", 8)
    assert torch.equal(vd[0, :3], va[0, :3]) and torch.equal(vd[1, :2], va[1, :2])
    assert vd[0, 3] != va[0, 3] and vd[1, 2] != va[1, 2]


def test_inv17_bce_gradient_wrt_logit_is_sigmoid_minus_reward_over_batch():
    B = 12
    z = randn(B, seed=4, scale=2.0).requires_grad_(True)
    R = (torch.rand(B, generator=gen(5)) < 0.4).to(DT)
    out = C.bce_value_loss(z, R)
    (g,) = torch.autograd.grad(out.loss, z)
    assert_close(g, (torch.sigmoid(z.detach()) - R) / B, **TIGHT)
    s = torch.sigmoid(z.detach())
    assert_close(out.loss, -(R * torch.log(s) + (1 - R) * torch.log1p(-s)).mean(), **TIGHT)
    # mini-batch normaliser override: ∂L/∂z = (σ(z) − R) / total_sequences
    out = C.bce_value_loss(z, R, total_sequences=40)
    (g,) = torch.autograd.grad(out.loss, z)
    assert_close(g, (torch.sigmoid(z.detach()) - R) / 40, **TIGHT)
    # token-level critic [B, T] with a mask, token-mean: (σ − R)/#valid on valid, 0 elsewhere
    mask = gapped_mask(6, 5, seed=6)
    zt = randn(6, 5, seed=7).requires_grad_(True)
    Rt = (torch.rand(6, 5, generator=gen(8)) < 0.5).to(DT)
    out = C.bce_value_loss(zt, Rt, mask)
    (g,) = torch.autograd.grad(out.loss, zt)
    expected = torch.where(mask, (torch.sigmoid(zt.detach()) - Rt) / mask.sum(), 0.0)
    assert_close(g, expected, **TIGHT)


def test_inv17_tiny_logistic_critic_converges_to_empirical_success_rate():
    rates = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=DT)
    n = 2000
    prompt = torch.arange(4).repeat_interleave(n)  # [B] prompt id of each sample
    R = (torch.rand(4 * n, generator=gen(9), dtype=DT) < rates[prompt]).to(DT)
    p_hat = torch.stack([R[prompt == i].mean() for i in range(4)])
    assert bool(((p_hat - rates).abs() < 0.05).all())  # sanity of the sampler

    # analytic optimum: the BCE gradient vanishes at z = logit(p̂)
    z_star = torch.log(p_hat / (1 - p_hat)).requires_grad_(True)
    (g,) = torch.autograd.grad(C.bce_value_loss(z_star[prompt], R).loss, z_star)
    assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-15)

    # and an optimiser started from 0 finds V = sigmoid(z) = p̂
    z = torch.zeros(4, dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-14,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        # normalised per prompt (total_sequences = n): ∂L/∂z_i = σ(z_i) − p̂_i, well scaled
        loss = C.bce_value_loss(z[prompt], R, total_sequences=n).loss
        loss.backward()
        return loss

    opt.step(closure)
    # line searches cannot resolve loss changes below ~eps·loss, so ~sqrt(eps) in z is the floor
    assert_close(torch.sigmoid(z.detach()), p_hat, rtol=0, atol=1e-7)


@pytest.mark.parametrize("logp_scale", [0.0, 0.6])
def test_inv18_sppo_loss_equals_ppo_with_constant_critic_gae_gamma_lambda_one(logp_scale):
    B, T = 6, 8
    mask = ragged_mask([8, 3, 5, 1, 0, 7], T)
    R = torch.tensor([1, 0, 1, 0, 1, 0], dtype=DT)
    z = randn(B, seed=10, scale=1.5)
    old = randn(B, T, seed=11) - 1.5
    lp = old + logp_scale * randn(B, T, seed=12)  # ratios far enough to clip and dual-clip
    A_sppo = C.sppo_advantages(R, z)  # [B]

    v_prompt = torch.sigmoid(z)
    values = torch.where(mask, v_prompt[:, None].expand(B, T), torch.full((B, T), 123.0, dtype=DT))
    tok_r = C.token_level_rewards(R, mask)  # terminal reward, no KL
    A_gae, returns = C.gae_advantages(tok_r, values, mask, gamma=1.0, lam=1.0, whiten=False)
    assert_close(A_gae, C.broadcast_to_tokens(A_sppo, mask), **EXACT)
    assert_close(returns, torch.where(mask, R[:, None].expand(B, T), 0.0), **TIGHT)

    out_s, g_s = loss_and_grad("sppo", lp, old, A_sppo, mask)
    out_g, g_g = loss_and_grad("sppo", lp, old, A_gae, mask)
    assert_close(out_s.loss, out_g.loss, **TIGHT)
    assert_close(g_s, g_g, **TIGHT)
    if logp_scale:
        assert out_s.metrics["policy/clip_frac"] > 0  # the comparison covered clipped tokens


# ---------------------------------------------------------------------------------------------
# FIPO (19–24)
# ---------------------------------------------------------------------------------------------


def _fipo_data(B=5, L=37, seed=20):
    mask = ragged_mask([37, 20, 1, 0, 29], L)
    mask[4, 10:14] = False  # a gap inside a row
    delta = randn(B, L, seed=seed, scale=1.2)
    delta[0, 5] = 3.0  # ratio e^3 > 10: M = 0 under c = 10
    delta[1, 2] = 2.5  # > log 10 too
    delta = torch.where(mask, delta, torch.full_like(delta, 7.7))  # garbage at padding
    return delta, mask


@pytest.mark.parametrize("c", [None, 10.0])
@pytest.mark.parametrize("decay_rate", [32.0, 3.7])
def test_inv19_future_kl_chunked_equals_naive_and_scan(c, decay_rate):
    delta, mask = _fipo_data()
    L = delta.shape[1]
    gamma = 2.0 ** (-1.0 / decay_rate)
    naive = naive_future_kl(delta, mask, gamma, c)
    scan = scan_future_kl(delta, mask, gamma, c)
    assert_close(naive, scan, **TIGHT)
    for K in (1, 2, 5, 128, L, L + 3):
        fast = C.future_kl(delta, mask, decay_rate=decay_rate, dual_clip_c=c, chunk_size=K)
        quad = future_kl_quadratic(delta, mask, decay_rate=decay_rate, dual_clip_c=c, chunk_size=K)
        assert_close(fast, naive, **TIGHT)
        assert_close(quad, naive, **TIGHT)
        assert_close(fast, scan, **TIGHT)


@pytest.mark.parametrize("K", [1, 2, 3, 7, 128])
def test_inv19_future_kl_long_rows_multilevel_chunks_equal_scan(K):
    """L = 300 makes the chunk-total scan recurse several levels for small K."""
    B, L = 3, 300
    mask = ragged_mask([300, 257, 130], L)
    mask[0, 100:140] = False
    delta = randn(B, L, seed=21, scale=0.7)
    gamma = 2.0 ** (-1.0 / 32.0)
    ref = scan_future_kl(delta, mask, gamma, 10.0)
    got = C.future_kl(delta, mask, decay_rate=32.0, dual_clip_c=10.0, chunk_size=K)
    assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the generic discounted reverse cumsum agrees with a plain loop too
    x = randn(B, L, seed=22)
    y = C.discounted_reverse_cumsum(x, 0.93, chunk_size=K)
    assert_close(y, scan_future_kl(x, torch.ones(B, L, dtype=torch.bool), 0.93), **TIGHT)


def test_inv19_future_kl_naive_matches_hand_computed_example():
    """Guard the local reference itself on a 1×4 example (γ = 1/2 ⇔ decay_rate = 1)."""
    delta = torch.tensor([[0.5, 3.0, -1.0, 0.25]], dtype=DT)
    mask = torch.tensor([[True, True, True, False]])
    # c = 10: token 1 (e^3 > 10) excluded; token 3 is padding
    expected = torch.tensor([[0.5 + 0.25 * -1.0, -0.5, -1.0, 0.0]], dtype=DT)
    assert_close(naive_future_kl(delta, mask, 0.5, 10.0), expected, **EXACT)
    assert_close(C.future_kl(delta, mask, decay_rate=1.0, dual_clip_c=10.0), expected, **TIGHT)


def test_inv20_future_kl_decay_limits():
    delta, mask = _fipo_data()
    c = 10.0
    M = mask & (delta <= math.log(c))
    D = torch.where(M, delta, torch.zeros_like(delta))
    suffix = D.flip(-1).cumsum(-1).flip(-1)
    suffix = torch.where(mask, suffix, torch.zeros_like(suffix))
    for fn in (C.future_kl, future_kl_quadratic):
        # τ → ∞ (γ → 1): the plain suffix sum of M_kΔ_k
        big = fn(delta, mask, decay_rate=1e13, dual_clip_c=c)
        assert_close(big, suffix, rtol=0, atol=1e-9)
        # τ very small (γ ≈ 2^−1000): only the current token, M_tΔ_t
        small = fn(delta, mask, decay_rate=1e-3, dual_clip_c=c)
        assert_close(small, D, rtol=0, atol=1e-250)
    assert_close(C.future_kl(delta, mask, decay_rate=math.inf, dual_clip_c=c), suffix, **TIGHT)
    # γ underflowing to exactly 0 (0^0 = 1) in the linear-time path
    assert_close(C.future_kl(delta, mask, decay_rate=1e-6, dual_clip_c=c), D, **EXACT)


@pytest.mark.parametrize("fn", [C.future_kl, future_kl_quadratic])
def test_inv21_future_kl_ignores_tokens_with_zero_participation(fn):
    delta, mask = _fipo_data()
    c = 10.0
    F0 = fn(delta, mask, decay_rate=32.0, dual_clip_c=c, chunk_size=4)
    assert bool((F0[~mask] == 0).all())  # F = 0 at padding
    excluded = mask & (delta > math.log(c))
    assert int(excluded.sum()) >= 2
    perturbed = delta.clone()
    noise = randn(*delta.shape, seed=23, scale=5.0)
    perturbed[~mask] = noise[~mask]  # padding: any value
    perturbed[excluded] = delta[excluded] + noise[excluded].abs() + 0.1  # still ratio > c
    F1 = fn(perturbed, mask, decay_rate=32.0, dual_clip_c=c, chunk_size=4)
    assert_close(F1, F0, **EXACT)
    # non-finite garbage at padding and a +inf shift on an excluded token change nothing either
    perturbed[~mask] = torch.nan
    perturbed[0, 5] = torch.inf
    F2 = fn(perturbed, mask, decay_rate=32.0, dual_clip_c=c, chunk_size=4)
    assert_close(F2, F0, **EXACT)
    # control: perturbing a participating token does change F
    ctrl = delta.clone()
    ctrl[0, 6] += 0.5
    assert not torch.equal(fn(ctrl, mask, decay_rate=32.0, dual_clip_c=c, chunk_size=4), F0)


@pytest.mark.parametrize(
    ("lo", "hi", "safety"),
    [(1.0, 1.2, 10.0), (0.8, 1.2, 3.0), (1.0, 1.2, 4.0), (0.5, 2.0, None), (None, 1.5, 2.0)],
)
def test_inv22_influence_weights_range_and_safety_rule(lo, hi, safety):
    B, T = 8, 16
    mask = gapped_mask(B, T, seed=30)
    F = randn(B, T, seed=31, scale=0.5)
    adv = randn(B, T, seed=32)
    log_ratio = randn(B, T, seed=33, scale=2.0)  # many ratios above 2, 3, 4 and 10
    f = C.influence_weights(
        F, adv, log_ratio, mask, influence_min=lo, influence_max=hi, safety_threshold=safety
    )
    assert_close(f, ref_influence(F, adv, log_ratio, mask, lo, hi, safety), **TIGHT)
    assert bool((f[~mask] == 1).all())
    v = f[mask]
    if lo is not None:
        assert bool((v >= lo).all()) and bool((v == lo).any())
    if hi is not None:
        assert bool((v <= hi).all()) and bool((v == hi).any())
    if lo == 1.0:  # high-only mode ⇒ f ≥ 1
        assert bool((v >= 1).all())
    if safety is not None:
        risky = mask & (adv < 0) & (log_ratio > math.log(safety))
        assert int(risky.sum()) > 0
        assert bool((f[risky] <= 1).all())
        if lo == 1.0:
            assert bool((f[risky] == 1).all())
        # positive-advantage tokens with the same large ratios are not capped
        big_pos = mask & (adv > 0) & (log_ratio > math.log(safety)) & (F > 0.05)
        if hi is None or hi > 1:
            assert bool((f[big_pos] > 1).all())
    # detached even when its inputs carry gradient
    Fg = F.clone().requires_grad_(True)
    assert not C.influence_weights(Fg, adv, log_ratio, mask).requires_grad


def _fipo_policy_data(seed=40, B=6, T=12, scale=0.08):
    """Moderate shifts: exp(F) falls strictly inside wide ranges, no ratio exceeds c = 10."""
    mask = ragged_mask([12, 9, 4, 12, 1, 7], T)
    mask[3, 5:8] = False
    old = randn(B, T, seed=seed) - 2.0
    lp = old + randn(B, T, seed=seed + 1, scale=scale) + 0.03
    adv = randn(B, seed=seed + 2)
    return lp, old, adv, mask


@pytest.mark.parametrize(("lo", "hi"), [(1.0, 1.2), (0.8, 1.2), (0.1, 10.0)])
def test_inv23_fipo_gradient_equals_dapo_with_constant_premultiplied_advantages(lo, hi):
    lp, old, adv, mask = _fipo_policy_data()
    delta = torch.where(mask, lp - old, torch.zeros_like(lp))
    F = naive_future_kl(delta, mask, 2.0 ** (-1 / 32.0), 10.0)
    adv_tok = C.broadcast_to_tokens(adv, mask)
    f = ref_influence(F, adv_tok, delta, mask, lo, hi, 10.0)
    if (lo, hi) == (0.1, 10.0):
        assert bool(((f[mask] > lo) & (f[mask] < hi)).all())  # the clip never hides a gradient
    assert bool((f[mask] != 1).any())
    kw = {"influence_min": lo, "influence_max": hi}
    for drop in (True, False):
        fipo, g_fipo = loss_and_grad(
            "fipo", lp, old, adv, mask, drop_dual_clipped_sequences=drop, **kw
        )
        if drop:
            assert fipo.metrics["fipo/dropped_seqs"] == 0
        dapo, g_dapo = loss_and_grad("dapo", lp, old, adv_tok * f, mask)
        assert_close(fipo.loss, dapo.loss, **TIGHT)
        assert_close(g_fipo, g_dapo, **TIGHT)
    # sanity: the weights matter (plain DAPO differs)
    _, g_plain = loss_and_grad("dapo", lp, old, adv, mask)
    assert not torch.allclose(g_fipo, g_plain, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("drop", [False, True])
def test_inv23_fipo_with_unit_weight_range_equals_dapo(drop):
    """influence_min = influence_max = 1 ⇒ f ≡ 1 ⇒ FIPO ≡ DAPO (value and gradient)."""
    B, T = 6, 10
    mask = ragged_mask([10, 7, 3, 10, 5, 8], T)
    old = randn(B, T, seed=50) - 2.0
    lp = old + randn(B, T, seed=51, scale=0.8)
    if not drop:
        lp[0, :4] = old[0, :4] + 3.0  # several ratios > c in one row: dual clip binds
    adv = randn(B, seed=52)
    adv[0] = -1.0
    fipo, g_f = loss_and_grad(
        "fipo",
        lp,
        old,
        adv,
        mask,
        influence_min=1.0,
        influence_max=1.0,
        drop_dual_clipped_sequences=drop,
    )
    dapo, g_d = loss_and_grad("dapo", lp, old, adv, mask)
    if drop:
        assert fipo.metrics["fipo/dropped_seqs"] == 0
    else:
        assert dapo.metrics["policy/dual_clip_frac"] > 0
    assert_close(fipo.loss, dapo.loss, **TIGHT)
    assert_close(g_f, g_d, **TIGHT)
    assert fipo.metrics["fipo/weight_min"] == 1 and fipo.metrics["fipo/weight_max"] == 1


def _safety_batch():
    """One token per negative row with ratio > c = 10 (so the drop rule keeps the row), and
    positive shifts after it, so its future-KL weight would exceed 1 without the rule."""
    B, T = 4, 8
    mask = ragged_mask([8, 8, 6, 8], T)
    old = randn(B, T, seed=60) - 2.5
    lp = old + randn(B, T, seed=61, scale=0.05) + 0.05  # small positive drift: F > 0
    lp[0, 2] = old[0, 2] + math.log(12.0)  # w = 12 > c, A < 0
    lp[2, 1] = old[2, 1] + math.log(25.0)  # w = 25 > c, A < 0
    lp[1, 3] = old[1, 3] + math.log(5.0)  # 3 < w = 5 < c, A < 0: only a threshold of 3 sees it
    adv = torch.tensor([-1.0, -0.5, -2.0, 1.0], dtype=DT)
    return lp, old, adv, mask


@pytest.mark.parametrize("preset", ["official_32b", "7b"])
def test_fipo_safety_rule_at_or_above_c_changes_no_gradient(preset):
    """With a safety threshold ≥ the dual-clip constant c (FIPO's 32B setting: both 10), every
    token the rule touches (Â < 0, w > threshold ≥ c) is dual-clipped, its loss −Ã·c has zero
    gradient: switching the rule off or moving the threshold within [c, ∞) changes the loss
    value and the fipo/* metrics, never the gradient. Below c (the 7B setting, 3) it does."""
    lp, old, adv, mask = _safety_batch()
    kw = {**C.FIPO_PRESETS[preset], "log_ratio_clamp": None}
    runs = {
        t: loss_and_grad("fipo", lp, old, adv, mask, **(kw | {"safety_threshold": t}))
        for t in (None, 10.0, 20.0, 3.0)
    }
    (on, g_on), (off, g_off) = runs[10.0], runs[None]
    assert on.metrics["fipo/dropped_seqs"] == 0 and on.metrics["policy/dual_clip_frac"] > 0
    assert on.metrics["fipo/safety_frac"] > 0  # the rule fired on the w > 10 tokens
    assert not torch.allclose(on.loss, off.loss)  # the loss value moves (f at those tokens)
    assert torch.equal(g_on, g_off)  # the gradient does not, bit for bit
    assert torch.equal(runs[20.0][1], g_off)
    assert not torch.allclose(runs[3.0][1], g_off)  # below c the rule reaches live tokens


def _drop_batch():
    """Row 0: two tokens with Â<0, w>c (dropped). Row 1: exactly one (kept).
    Row 2: Â>0 with many w>c (kept). Rows 3–4: ordinary."""
    B, T = 5, 8
    mask = ragged_mask([8, 6, 8, 5, 7], T)
    old = randn(B, T, seed=60) - 2.0
    lp = old + randn(B, T, seed=61, scale=0.3)
    lp[0, 1] = old[0, 1] + 2.6
    lp[0, 4] = old[0, 4] + 3.1
    lp[1, 3] = old[1, 3] + 2.9
    lp[2, :5] = old[2, :5] + 2.7
    lp[3, 6] = old[3, 6] + 9.0  # padding position: must not count
    adv = torch.tensor([-0.9, -0.4, 1.1, 0.6, -0.7], dtype=DT)
    return lp, old, adv, mask


def test_inv24_dual_clip_drop_mask_counts_valid_negative_tokens_above_c():
    lp, old, adv, mask = _drop_batch()
    delta = torch.where(mask, lp - old, torch.zeros_like(lp))
    keep = C.dual_clip_drop_mask(C.broadcast_to_tokens(adv, mask), delta, mask, 10.0)
    assert keep.tolist() == [False, True, True, True, True]
    # padding entries with huge shifts and negative advantages are ignored
    raw = lp - old  # not zeroed at padding
    raw[3, 5:] = 9.0  # three padding "hits" in row 3 (length 5)
    adv_all = torch.where(mask, adv[:, None], torch.tensor(-1.0, dtype=DT))
    keep_raw = C.dual_clip_drop_mask(adv_all, raw, mask, 10.0)
    assert keep_raw.tolist() == [False, True, True, True, True]


def test_inv24_dropped_sequence_leaves_numerator_and_denominator():
    lp, old, adv, mask = _drop_batch()
    full, g_full = loss_and_grad("fipo", lp, old, adv, mask)
    assert full.metrics["fipo/dropped_seqs"] == 1
    sub, g_sub = loss_and_grad("fipo", lp[1:], old[1:], adv[1:], mask[1:])
    assert sub.metrics["fipo/dropped_seqs"] == 0  # the single-hit row 1 is kept
    assert_close(full.loss, sub.loss, **TIGHT)
    assert_close(g_full[1:], g_sub, **TIGHT)
    assert bool((g_full[0] == 0).all())
    assert bool((g_full[3:].abs().sum(-1) > 0).all())
    # kept row 1 contributes to the gradient on its in-clip tokens
    assert bool((g_full[1][mask[1]] != 0).sum() >= 3)

    # explicit formula: DAPO with the same constant weights on the kept rows' tokens only
    delta = torch.where(mask, lp - old, torch.zeros_like(lp))
    adv_tok = C.broadcast_to_tokens(adv, mask)
    F = naive_future_kl(delta, mask, 2.0 ** (-1 / 32.0), 10.0)
    f = ref_influence(F, adv_tok, delta, mask, 1.0, 1.2, 10.0)
    kept = mask.clone()
    kept[0] = False
    dapo, g_dapo = loss_and_grad("dapo", lp, old, adv_tok * f, kept)
    assert_close(full.loss, dapo.loss, **TIGHT)
    assert_close(g_full, g_dapo, **TIGHT)
    # row 0 is out of the denominator: the loss differs from a numerator-only drop
    per_tok = C.clipped_surrogate(
        torch.exp(delta), adv_tok * f, clip_low=0.2, clip_high=0.28, dual_clip_c=10.0
    )
    numerator_only = torch.where(kept, per_tok, 0.0).sum() / mask.sum()
    assert not torch.allclose(full.loss, numerator_only)

    # with the rule off, row 0 is back
    off, g_off = loss_and_grad("fipo", lp, old, adv, mask, drop_dual_clipped_sequences=False)
    assert not torch.allclose(off.loss, full.loss)
    assert bool((g_off[0] != 0).any())


def test_inv24_single_hit_row_is_kept_alone():
    lp, old, adv, mask = _drop_batch()
    rows = [1]
    out, g = loss_and_grad("fipo", lp[rows], old[rows], adv[rows], mask[rows])
    assert out.metrics["fipo/dropped_seqs"] == 0
    assert out.loss != 0 and bool((g != 0).any())
    out0, g0 = loss_and_grad("fipo", lp[[0]], old[[0]], adv[[0]], mask[[0]])
    assert out0.metrics["fipo/dropped_seqs"] == 1
    assert out0.loss == 0 and bool((g0 == 0).all())


DOCUMENTED_PRESETS = {
    # name: (influence range, safety threshold, clip_low, clip_high, c, drop, log-ratio clamp)
    "official_32b": ((1.0, 1.2), 10.0, 0.2, 0.28, 10.0, True, 20.0),
    "7b": ((0.8, 1.2), 3.0, 0.2, 0.28, 10.0, True, 20.0),
    "ms_swift": ((1.0, 1.2), 4.0, 0.2, 0.2, None, False, None),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_PRESETS))
def test_inv22_fipo_presets_produce_documented_ranges(name):
    (lo, hi), safety, cl, ch, c, drop, clamp = DOCUMENTED_PRESETS[name]
    p = C.FIPO_PRESETS[name]
    assert (p["influence_min"], p["influence_max"], p["safety_threshold"]) == (lo, hi, safety)
    assert (p["clip_low"], p["clip_high"], p["dual_clip_c"]) == (cl, ch, c)
    assert (p["drop_dual_clipped_sequences"], p["log_ratio_clamp"]) == (drop, clamp)
    assert p["decay_rate"] == 32.0
    # the weights the preset yields span exactly its documented interval
    B, T = 8, 16
    mask = gapped_mask(B, T, seed=70)
    F = randn(B, T, seed=71, scale=0.6)
    adv = randn(B, T, seed=72)
    log_ratio = randn(B, T, seed=73, scale=0.3)
    f = C.influence_weights(
        F, adv, log_ratio, mask, influence_min=lo, influence_max=hi, safety_threshold=safety
    )
    assert f[mask].min() == lo and f[mask].max() == hi
    # and inside the loss
    old = randn(B, T, seed=74) - 2.0
    lp = old + randn(B, T, seed=75, scale=0.4)
    out = C.policy_loss(
        "fipo", logprobs=lp, old_logprobs=old, advantages=randn(B, seed=76), mask=mask, **p
    )
    assert lo <= out.metrics["fipo/weight_min"] <= out.metrics["fipo/weight_max"] <= hi
    assert out.metrics["fipo/weight_at_max_frac"] > 0
    assert ("fipo/dropped_seqs" in out.metrics) == drop


@pytest.mark.parametrize("name", sorted(DOCUMENTED_PRESETS))
def test_inv23_fipo_presets_on_first_minibatch_equal_dapo(name):
    """logp == old ⇒ F ≡ 0, f ≡ 1 ⇒ FIPO(preset) ≡ DAPO with the preset's clip settings."""
    p = C.FIPO_PRESETS[name]
    clip_keys = ("clip_low", "clip_high", "dual_clip_c", "log_ratio_clamp")
    dapo_cfg = C.resolve_policy_loss_config("dapo")
    same_as_dapo = all(getattr(dapo_cfg, k) == p[k] for k in clip_keys)
    assert same_as_dapo == (name != "ms_swift")
    B, T = 6, 9
    mask = ragged_mask([9, 4, 1, 9, 6, 0], T)
    lp = randn(B, T, seed=80) - 2.0
    adv = randn(B, seed=81)
    fipo, g_f = loss_and_grad("fipo", lp, lp.clone(), adv, mask, **p)
    overrides = {} if same_as_dapo else {k: p[k] for k in clip_keys}
    dapo, g_d = loss_and_grad("dapo", lp, lp.clone(), adv, mask, **overrides)
    assert_close(fipo.loss, dapo.loss, **EXACT)
    assert_close(g_f, g_d, **EXACT)
    assert fipo.metrics["fipo/weight_min"] == 1 and fipo.metrics["fipo/weight_max"] == 1
    assert fipo.metrics["fipo/future_kl_mean"] == 0


# ---------------------------------------------------------------------------------------------
# DAPO pieces (28–30)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("L_max", "L_cache", "factor"), [(20, 8, 1.0), (16, 16, 1.0), (30, 4, 0.5)]
)
def test_inv28_soft_overlong_penalty_shape(L_max, L_cache, factor):
    start = L_max - L_cache
    lengths = torch.arange(0, L_max + 15)
    pen = C.soft_overlong_penalty(lengths, L_max, L_cache, factor=factor)
    assert pen.shape == lengths.shape
    expected = []
    for n in lengths.tolist():
        if n <= start:
            expected.append(0.0)
        elif n <= L_max:
            expected.append(factor * (start - n) / L_cache)
        else:
            expected.append(-factor)
    expected = torch.tensor(expected, dtype=DT).to(pen.dtype)
    assert_close(pen, expected, **EXACT)
    assert bool((pen[lengths <= start] == 0).all())
    assert bool((pen[lengths >= L_max] == -factor).all())  # exactly −1·factor at L_max and beyond
    assert bool((pen[1:] <= pen[:-1]).all())  # non-increasing
    # linear in between: constant first difference −factor/L_cache
    inner = (lengths >= start) & (lengths <= L_max)
    diffs = pen[inner][1:] - pen[inner][:-1]
    assert_close(diffs, torch.full_like(diffs, -factor / L_cache), rtol=1e-6, atol=1e-7)
    # continuous at L_max − L_cache (approached from above with real-valued lengths)
    near = torch.tensor([start, start + 1e-6, start + 1e-3], dtype=DT)
    p = C.soft_overlong_penalty(near, L_max, L_cache, factor=factor).to(DT)
    assert p[0] == 0 and abs(float(p[1])) < 1e-6 and abs(float(p[2])) < 1e-3


def test_inv29_mixed_group_mask_keeps_only_mixed_groups_with_nonzero_std():
    G, P = 4, 40
    correct = torch.rand(P * G, generator=gen(90)) < 0.5
    correct[:G] = True  # an all-correct group
    correct[G : 2 * G] = False  # an all-wrong group
    correct[2 * G : 3 * G] = torch.tensor([True, False, False, False])
    correct[3 * G : 4 * G] = torch.tensor([True, True, True, False])
    keep = C.mixed_group_mask(correct, G)
    n_correct = correct.view(P, G).sum(1)
    assert keep.tolist() == ((n_correct > 0) & (n_correct < G)).tolist()
    assert keep[:4].tolist() == [False, False, True, True]
    assert 0 < int(keep.sum()) < P
    # 0/1 ints give the same answer
    assert torch.equal(C.mixed_group_mask(correct.long(), G), keep)
    # after filtering, each kept group's DAPO reward (±1) advantage has non-zero (unit) std
    rewards = correct.to(DT) * 2 - 1
    kept_rewards = rewards.view(P, G)[keep].reshape(-1)
    A = C.group_advantages(kept_rewards, G).view(-1, G)
    std = A.std(dim=1)
    assert bool((std > 0.5).all())
    assert_close(std, torch.ones_like(std), rtol=0, atol=1e-5)  # 1/(1+eps/std) with eps 1e-6
    # whereas dropped groups would have had zero advantages
    A_drop = C.group_advantages(rewards.view(P, G)[~keep].reshape(-1), G)
    assert bool((A_drop == 0).all())


def test_inv29_mixed_group_mask_group_size_one_is_kept():
    """verl's convention (spec §4.2): groups of size 1 are always kept."""
    assert C.mixed_group_mask(torch.tensor([True, False, True]), 1).tolist() == [True] * 3


@pytest.mark.parametrize("name", ["dapo", "fipo", "grpo"])
def test_inv30_overlong_filter_removes_truncated_rows_from_loss_and_gradient(name):
    B, T = 5, 7
    mask = ragged_mask([7, 7, 3, 6, 7], T)
    truncated = torch.tensor([True, False, False, False, True])
    fmask = C.overlong_filter_mask(mask, truncated)
    assert torch.equal(fmask, mask & ~truncated[:, None])
    assert not fmask[0].any() and not fmask[4].any() and torch.equal(fmask[1:4], mask[1:4])
    old = randn(B, T, seed=100) - 2.0
    lp = old + randn(B, T, seed=101, scale=0.5)
    lp[0] = old[0] + 40.0  # garbage in truncated rows must not matter
    lp[4] = torch.nan
    adv = randn(B, seed=102)
    ref = randn(B, T, seed=103) - 2.0
    kw = {"ref_logprobs": ref} if name == "grpo" else {}
    out, g = loss_and_grad(name, lp, old, adv, fmask, **kw)
    rows = [1, 2, 3]
    kw_sub = {"ref_logprobs": ref[rows]} if name == "grpo" else {}
    sub, g_sub = loss_and_grad(name, lp[rows], old[rows], adv[rows], mask[rows], **kw_sub)
    assert_close(out.loss, sub.loss, **TIGHT)
    assert_close(g[rows], g_sub, **TIGHT)
    assert bool((g[[0, 4]] == 0).all())


# ---------------------------------------------------------------------------------------------
# GAE (32)
# ---------------------------------------------------------------------------------------------


def _gae_data(seed=110):
    B, T = 7, 11
    mask = gapped_mask(B, T, seed=seed)
    mask[4] = ragged_mask([5], T)[0]
    rewards = randn(B, T, seed=seed + 1)  # values at invalid positions must be ignored
    values = randn(B, T, seed=seed + 2)
    return rewards, values, mask


def test_inv32_gae_lambda_zero_is_one_step_td_error():
    rewards, values, mask = _gae_data()
    for gamma in (1.0, 0.9):
        adv, ret = C.gae_advantages(rewards, values, mask, gamma=gamma, lam=0.0, whiten=False)
        td = td_reference(rewards, values, mask, gamma)
        assert_close(adv, td, **TIGHT)
        assert_close(ret, torch.where(mask, td + values, 0.0), **TIGHT)


def test_inv32_gae_gamma_lambda_one_terminal_reward_gives_R_minus_V_and_returns_R():
    _, values, mask = _gae_data(seed=120)
    B, T = values.shape
    R = randn(B, seed=121)
    tok_r = C.token_level_rewards(R, mask)
    # the terminal reward sits on the last valid token only
    last = [max((t for t in range(T) if mask[b, t]), default=None) for b in range(B)]
    for b, t in enumerate(last):
        nz = tok_r[b].nonzero().flatten().tolist()
        assert nz == ([] if t is None else [t])
    adv, ret = C.gae_advantages(tok_r, values, mask, gamma=1.0, lam=1.0, whiten=False)
    assert_close(adv, torch.where(mask, R[:, None] - values, 0.0), **TIGHT)
    assert_close(ret, torch.where(mask, R[:, None].expand(B, T), 0.0), **TIGHT)


@pytest.mark.parametrize("seed", [130, 131, 132])
def test_inv32_gae_matches_loop_reference_on_gapped_masks(seed):
    rewards, values, mask = _gae_data(seed=seed)
    g = torch.rand(2, generator=gen(seed), dtype=DT)
    gamma, lam = float(0.5 + 0.5 * g[0]), float(g[1])
    adv, ret = C.gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    assert_close(adv, ref_adv, **TIGHT)
    assert_close(ret, ref_ret, **TIGHT)
    # invalid positions hold nothing and do not influence valid ones
    r2 = torch.where(mask, rewards, randn(*rewards.shape, seed=seed + 9))
    v2 = torch.where(mask, values, randn(*values.shape, seed=seed + 10))
    adv2, ret2 = C.gae_advantages(r2, v2, mask, gamma=gamma, lam=lam, whiten=False)
    assert_close(adv2, adv, **EXACT)
    assert_close(ret2, ret, **EXACT)


def test_inv32_gae_whitening_mean_zero_unbiased_std_one_over_valid_tokens():
    rewards, values, mask = _gae_data(seed=140)
    raw, ret = C.gae_advantages(rewards, values, mask, gamma=0.97, lam=0.9, whiten=False)
    adv, ret_w = C.gae_advantages(rewards, values, mask, gamma=0.97, lam=0.9, whiten=True)
    assert_close(ret_w, ret, **EXACT)  # returns come before whitening
    v = adv[mask]
    assert abs(float(v.mean())) < 1e-12
    assert_close(v.std(unbiased=True), torch.tensor(1.0, dtype=DT), rtol=0, atol=1e-7)
    assert bool((adv[~mask] == 0).all())
    r = raw[mask]
    expected = (r - r.mean()) / torch.sqrt(r.var(unbiased=True) + 1e-8)
    assert_close(v, expected, **TIGHT)


# ---------------------------------------------------------------------------------------------
# ReMax and the clipped value loss (33)
# ---------------------------------------------------------------------------------------------


def test_inv33_remax_same_reward_for_sampled_and_greedy_gives_zero_advantage():
    r = torch.tensor([1.0, 0.0, 0.37, -2.5], dtype=DT)
    assert_close(C.remax_advantages(r, r.clone()), torch.zeros_like(r), **EXACT)
    mask = gapped_mask(6, 8, seed=150)
    scores = randn(6, seed=151)
    tok = C.token_level_rewards(scores, mask)
    A = C.remax_advantages(tok, scores.clone(), mask)
    assert_close(A, torch.zeros_like(A), **EXACT)
    # with a KL penalty in the reward only the KL part remains: −β Σ_{t'≥t} k1_{t'}
    old = randn(6, 8, seed=152) - 2.0
    ref = randn(6, 8, seed=153) - 2.0
    beta = 0.05
    tok_kl = C.token_level_rewards(
        scores, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=beta, kl_estimator="k1"
    )
    A_kl = C.remax_advantages(tok_kl, scores.clone(), mask)
    k1 = torch.where(mask, old - ref, 0.0).tolist()
    expected = torch.zeros(6, 8, dtype=DT)
    for b in range(6):
        acc = 0.0
        for t in reversed(range(8)):
            if mask[b, t]:
                acc += -beta * k1[b][t]
                expected[b, t] = acc
    assert_close(A_kl, expected, **TIGHT)
    # and a different greedy reward shifts every valid token by the difference
    A_shift = C.remax_advantages(tok, scores - 0.25, mask)
    assert_close(A_shift, torch.where(mask, 0.25, 0.0).to(DT), **TIGHT)


def test_inv33_clipped_value_loss_hand_checked_two_tokens():
    mask = torch.tensor([[True, True]])
    old = torch.tensor([[0.0, 1.8]], dtype=DT)
    ret = torch.tensor([[2.0, 3.0]], dtype=DT)

    # token 0: V moved 1.0 > ε_v = 0.5 away from V_old, and the clipped branch is larger:
    #   (V−G)² = 1, (clip(V) − G)² = (0.5 − 2)² = 2.25 → 2.25, gradient 0 (clip binds)
    # token 1: inside the clip: (2 − 3)² = 1 → 1, ∂/∂V = 0.5 · ½ · 2(V − G) = −0.5
    V = torch.tensor([[1.0, 2.0]], dtype=DT, requires_grad=True)
    out = C.clipped_value_loss(V, old, ret, mask, clip=0.5)
    (g,) = torch.autograd.grad(out.loss, V)
    assert_close(out.loss, torch.tensor(0.5 * (2.25 + 1.0) / 2, dtype=DT), **TIGHT)
    assert_close(g, torch.tensor([[0.0, -0.5]], dtype=DT), **TIGHT)
    assert_close(out.metrics["critic/value_clip_frac"], torch.tensor(0.5, dtype=DT), **TIGHT)

    # token 0 again with G = 0.2: V moved past the clip but the unclipped error is the larger
    #   (1 − 0.2)² = 0.64 > (0.5 − 0.2)² = 0.09 → 0.64, gradient 0.5 · ½ · 2 · 0.8 = 0.4
    ret2 = torch.tensor([[0.2, 3.0]], dtype=DT)
    out = C.clipped_value_loss(V, old, ret2, mask, clip=0.5)
    (g,) = torch.autograd.grad(out.loss, V)
    assert_close(out.loss, torch.tensor(0.5 * (0.64 + 1.0) / 2, dtype=DT), **TIGHT)
    assert_close(g, torch.tensor([[0.4, -0.5]], dtype=DT), **TIGHT)
    assert out.metrics["critic/value_clip_frac"] == 0

    # clip = None: plain squared error on the first case, gradient flows on token 0 too
    out = C.clipped_value_loss(V, old, ret, mask, clip=None)
    (g,) = torch.autograd.grad(out.loss, V)
    assert_close(out.loss, torch.tensor(0.5 * (1.0 + 1.0) / 2, dtype=DT), **TIGHT)
    assert_close(g, torch.tensor([[-0.5, -0.5]], dtype=DT), **TIGHT)

    # a masked-out second token contributes nothing
    out = C.clipped_value_loss(V, old, ret, torch.tensor([[True, False]]), clip=0.5)
    (g,) = torch.autograd.grad(out.loss, V)
    assert_close(out.loss, torch.tensor(0.5 * 2.25, dtype=DT), **TIGHT)
    assert_close(g, torch.zeros_like(g), **EXACT)
