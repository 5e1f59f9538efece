"""Slow, obviously-correct reference implementations of ``seqrl.core``.

Written only from ``/work/shared/spec/algorithms.md`` and the public API description, never from
the fast code. Every function loops over rows and time steps in plain Python and does its
arithmetic on 0-d torch tensors, element by element, so that autograd runs through the
reference as well and gradients can be compared with the vectorised implementation.
The one exception is :func:`future_kl_quadratic`, the FIPO paper's own (vectorised, O(L²))
method, kept here as a parity reference and as the baseline of ``benchmarks/future_kl.py``.

Conventions: ``mask`` is a bool ``[B, T]`` tensor (True = valid response token); losses are
minimised (``loss = -J``); positions with ``mask == False`` are skipped entirely, so whatever
values sit in padding can never leak into a result.
"""

from __future__ import annotations

import math

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Own copy of the preset table (API table; spec §1.7, §2.4, §3.6, §4.1-§4.6, §7).
POLICY_LOSS_PRESETS: dict[str, dict] = {
    "ppo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.2,
        dual_clip_c=3.0,
        agg="token-mean",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
    ),
    "grpo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.2,
        dual_clip_c=None,
        agg="seq-mean-token-mean",
        kl_coef=0.04,
        log_ratio_clamp=20.0,
    ),
    "dapo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.28,
        dual_clip_c=10.0,
        agg="token-mean",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
    ),
    "dr_grpo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.2,
        dual_clip_c=None,
        agg="seq-mean-token-sum-norm",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
    ),
    "gspo": dict(
        ratio_level="sequence",
        clip_low=3e-4,
        clip_high=4e-4,
        dual_clip_c=None,
        agg="seq-mean-token-mean",
        kl_coef=0.0,
        log_ratio_clamp=10.0,
    ),
    "gspo_token": dict(
        ratio_level="sequence_token",
        clip_low=3e-4,
        clip_high=4e-4,
        dual_clip_c=None,
        agg="seq-mean-token-mean",
        kl_coef=0.0,
        log_ratio_clamp=10.0,
    ),
    "sppo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.2,
        dual_clip_c=3.0,
        agg="token-mean",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
    ),
    "fipo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.28,
        dual_clip_c=10.0,
        agg="token-mean",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
        decay_rate=32.0,
        influence_min=1.0,
        influence_max=1.2,
        safety_threshold=10.0,
        drop_dual_clipped_sequences=True,
    ),
    "rloo": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.2,
        dual_clip_c=3.0,
        agg="token-mean",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
    ),
    "remax": dict(
        ratio_level="token",
        clip_low=0.2,
        clip_high=0.2,
        dual_clip_c=3.0,
        agg="token-mean",
        kl_coef=0.0,
        log_ratio_clamp=20.0,
    ),
}
for _cfg in POLICY_LOSS_PRESETS.values():
    _cfg.setdefault("kl_estimator", "k3")
    _cfg.setdefault("max_tokens", None)

_FIPO_KEYS = (
    "decay_rate",
    "influence_min",
    "influence_max",
    "safety_threshold",
    "drop_dual_clipped_sequences",
)
# hparams the reference understands; ``chunk_size`` only changes the fast algorithm, not the maths.
_ALLOWED_HPARAMS = set(POLICY_LOSS_PRESETS["fipo"]) | {"max_tokens", "kl_estimator", "chunk_size"}


# ----------------------------------------------------------------------------------------------
# helpers


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype)


def _stack_matrix(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.stack(r) for r in rows])


def _f(x) -> float:
    """Python float of a 0-d tensor (detached: used only for decisions and detached weights)."""
    return float(x.detach())


def _valid(mask: torch.Tensor, i: int, t: int) -> bool:
    return bool(mask[i, t])


def _row_count(mask: torch.Tensor, i: int) -> int:
    return sum(1 for t in range(mask.shape[1]) if _valid(mask, i, t))


def _clamp_sym(x: torch.Tensor, c: float | None) -> torch.Tensor:
    """clamp(x, -c, c); identity when c is None."""
    if c is None:
        return x
    return torch.clamp(x, -c, c)


def _adv_at(adv: torch.Tensor, i: int, t: int) -> torch.Tensor:
    return adv[i] if adv.dim() == 1 else adv[i, t]


# ----------------------------------------------------------------------------------------------
# masks / aggregation


def ref_masked_sum(x, mask):
    """S = Σ_{i,t} m_{i,t} x_{i,t} (whole tensor)."""
    s = _zero(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if _valid(mask, i, t):
                s = s + x[i, t]
    return s


def ref_masked_mean(x, mask):
    """μ = Σ m x / Σ m over the whole tensor."""
    n = sum(_row_count(mask, i) for i in range(mask.shape[0]))
    return ref_masked_sum(x, mask) / n


def ref_masked_var(x, mask, unbiased=True):
    """σ² = Σ m (x − μ)² / (n − 1) (unbiased) or / n."""
    mu = ref_masked_mean(x, mask)
    n = 0
    s = _zero(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if _valid(mask, i, t):
                s = s + (x[i, t] - mu) ** 2
                n += 1
    return s / (n - 1) if unbiased else s / n


def ref_whiten(x, mask, eps=1e-8):
    """x̂ = (x − μ)/sqrt(σ²_unbiased + eps) on valid entries (μ, σ² over all valid entries); 0 elsewhere."""
    mu = ref_masked_mean(x, mask)
    var = ref_masked_var(x, mask, unbiased=True)
    rows = []
    for i in range(x.shape[0]):
        row = []
        for t in range(x.shape[1]):
            if _valid(mask, i, t):
                row.append((x[i, t] - mu) / torch.sqrt(var + eps))
            else:
                row.append(_zero(x))
        rows.append(row)
    return _stack_matrix(rows)


def ref_sequence_lengths(mask):
    """|y_i| = Σ_t m_{i,t}."""
    return torch.tensor([_row_count(mask, i) for i in range(mask.shape[0])], dtype=torch.long)


def ref_aggregate(values, mask, mode, max_tokens=None, total_tokens=None, total_sequences=None):
    """token-mean Σmℓ/Σm ; seq-mean-token-mean (1/N)Σ_i Σ_t mℓ/|y_i| ; seq-mean-token-sum (1/N)Σ_i Σ_t mℓ ; -norm: … / max_tokens."""
    B, T = mask.shape
    row_sums, row_counts = [], []
    for i in range(B):
        s = _zero(values)
        n = 0
        for t in range(T):
            if _valid(mask, i, t):
                s = s + values[i, t]
                n += 1
        row_sums.append(s)
        row_counts.append(n)
    if mode == "token-mean":
        total = _zero(values)
        for s in row_sums:
            total = total + s
        denom = total_tokens if total_tokens is not None else max(sum(row_counts), 1)
        return total / denom
    if total_sequences is not None:
        N = total_sequences
    else:
        N = max(sum(1 for n in row_counts if n >= 1), 1)
    total = _zero(values)
    if mode == "seq-mean-token-mean":
        for s, n in zip(row_sums, row_counts, strict=True):
            total = total + s / max(n, 1)
        return total / N
    if mode == "seq-mean-token-sum":
        for s in row_sums:
            total = total + s
        return total / N
    if mode == "seq-mean-token-sum-norm":
        if max_tokens is None:
            raise ValueError("seq-mean-token-sum-norm needs max_tokens")
        for s in row_sums:
            total = total + s / max_tokens
        return total / N
    raise ValueError(f"unknown aggregation mode {mode!r}")


def ref_broadcast_to_tokens(x, mask):
    """X_{i,t} = x_i if m_{i,t} else 0."""
    rows = []
    for i in range(mask.shape[0]):
        rows.append([x[i] if _valid(mask, i, t) else _zero(x) for t in range(mask.shape[1])])
    return _stack_matrix(rows)


# ----------------------------------------------------------------------------------------------
# ratios


def ref_token_log_ratio(logp, old, mask, clamp=None):
    """δ_{i,t} = clamp(logp − oldlogp, −c, c) on valid tokens, 0 elsewhere."""
    rows = []
    for i in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            if _valid(mask, i, t):
                row.append(_clamp_sym(logp[i, t] - old[i, t], clamp))
            else:
                row.append(_zero(logp))
        rows.append(row)
    return _stack_matrix(rows)


def ref_sequence_log_ratio(logp, old, mask):
    """log s_i = Σ_t m δ_{i,t} / max(Σ_t m, 1)  (GSPO Eq. 7, log space)."""
    out = []
    for i in range(logp.shape[0]):
        s = _zero(logp)
        n = 0
        for t in range(logp.shape[1]):
            if _valid(mask, i, t):
                s = s + (logp[i, t] - old[i, t])
                n += 1
        out.append(s / max(n, 1))
    return torch.stack(out)


def ref_gspo_token_log_ratio(logp, old, mask):
    """log s_{i,t} = logp_{i,t} − sg(logp_{i,t}) + sg(log s_i)  (GSPO Eq. 14); valid tokens only (0 elsewhere)."""
    ls = ref_sequence_log_ratio(logp, old, mask)
    rows = []
    for i in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            if _valid(mask, i, t):
                row.append(logp[i, t] - logp[i, t].detach() + ls[i].detach())
            else:
                row.append(_zero(logp))
        rows.append(row)
    return _stack_matrix(rows)


def ref_clipped_token_loss(w, A, clip_low, clip_high, dual_clip_c=None):
    """ℓ = max(−A w, −A clip(w, 1−ε_l, 1+ε_h)); if c and A < 0: ℓ = min(ℓ, −A c)  (spec §0.2)."""
    l1 = -A * w
    if w < 1.0 - clip_low:
        w_clipped = w * 0.0 + (1.0 - clip_low)  # constant (no gradient), keeps dtype
    elif w > 1.0 + clip_high:
        w_clipped = w * 0.0 + (1.0 + clip_high)
    else:
        w_clipped = w
    l2 = -A * w_clipped
    loss = l1 if l1 >= l2 else l2
    if dual_clip_c is not None and A < 0:
        l3 = -A * dual_clip_c
        if l3 < loss:
            loss = l3
    return loss


def ref_clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip_c=None):
    """Elementwise ref_clipped_token_loss over a full [B, T] matrix."""
    rows = []
    for i in range(ratio.shape[0]):
        rows.append(
            [
                ref_clipped_token_loss(ratio[i, t], adv[i, t], clip_low, clip_high, dual_clip_c)
                for t in range(ratio.shape[1])
            ]
        )
    return _stack_matrix(rows)


# ----------------------------------------------------------------------------------------------
# KL


def _kl_one(rho, estimator):
    if estimator == "k1":
        return rho
    if estimator == "k2":
        return 0.5 * rho * rho
    if estimator == "k3":
        return torch.exp(-rho) + rho - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def ref_kl(logp, ref, mask, estimator="k3"):
    """ρ = logp − reflogp; k1 = ρ, k2 = ρ²/2, k3 = e^{−ρ} + ρ − 1 on valid tokens, 0 elsewhere (spec §0.4)."""
    rows = []
    for i in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            if _valid(mask, i, t):
                row.append(_kl_one(logp[i, t] - ref[i, t], estimator))
            else:
                row.append(_zero(logp))
        rows.append(row)
    return _stack_matrix(rows)


# ----------------------------------------------------------------------------------------------
# returns / future KL


def ref_discounted_reverse_cumsum(x, gamma):
    """y_t = Σ_{k≥t} γ^{k−t} x_k (double loop, all positions)."""
    B, T = x.shape
    rows = []
    for i in range(B):
        row = []
        for t in range(T):
            s = _zero(x)
            for k in range(t, T):
                s = s + (gamma ** (k - t)) * x[i, k]
            row.append(s)
        rows.append(row)
    return _stack_matrix(rows)


def _fipo_keep_token(log_ratio, mask, i, k, dual_clip_c):
    """M_k = m_k · 1[exp(Δ_k) ≤ c]  (FIPO Eq. 5; spec §7 #17)."""
    if not _valid(mask, i, k):
        return False
    if dual_clip_c is None:
        return True
    return bool(torch.exp(log_ratio[i, k]) <= dual_clip_c)


def ref_future_kl_naive(log_ratio, mask, decay_rate, dual_clip_c=None):
    """F_t = Σ_{k=t}^{T} M_k γ^{k−t} Δ_k, γ = 2^{−1/τ} (FIPO Eq. 6, O(L²) double loop); 0 where m_t = 0."""
    gamma = 2.0 ** (-1.0 / decay_rate)
    B, T = log_ratio.shape
    rows = []
    for i in range(B):
        keep = [_fipo_keep_token(log_ratio, mask, i, k, dual_clip_c) for k in range(T)]
        row = []
        for t in range(T):
            s = _zero(log_ratio)
            if _valid(mask, i, t):
                for k in range(t, T):
                    if keep[k]:
                        s = s + (gamma ** (k - t)) * log_ratio[i, k]
            row.append(s)
        rows.append(row)
    return _stack_matrix(rows)


def ref_future_kl_scan(log_ratio, mask, decay_rate, dual_clip_c=None):
    """F_t = M_t Δ_t + γ F_{t+1}, F_{T+1} = 0 (reverse recurrence, runs through padding); output 0 where m_t = 0."""
    gamma = 2.0 ** (-1.0 / decay_rate)
    B, T = log_ratio.shape
    rows = []
    for i in range(B):
        row = [None] * T
        running = _zero(log_ratio)
        for t in range(T - 1, -1, -1):
            term = (
                log_ratio[i, t]
                if _fipo_keep_token(log_ratio, mask, i, t, dual_clip_c)
                else _zero(log_ratio)
            )
            running = term + gamma * running
            row[t] = running if _valid(mask, i, t) else _zero(log_ratio)
        rows.append(row)
    return _stack_matrix(rows)


def future_kl_quadratic(log_ratio, mask, *, decay_rate=32.0, dual_clip_c=None, chunk_size=128):
    """The FIPO paper's App. G method: F = (M·Δ) @ Uᵀ by column chunks of the [L, L] decay matrix.

    U[t, k] = γ^(k−t) for k ≥ t, else 0; O(B·L²) time, O(B·L + L·K) memory. Vectorised (unlike the
    loops above) so that ``benchmarks/future_kl.py`` can time it at paper lengths as the baseline
    of ``seqrl.core.future_kl``; the tests hold it to the loops.
    """
    keep = mask if dual_clip_c is None else mask & (log_ratio <= math.log(dual_clip_c))
    shifts = torch.where(keep, log_ratio, torch.zeros_like(log_ratio))  # [B, L]  M_k Δ_k
    L = shifts.shape[1]
    gamma = torch.tensor(2.0 ** (-1.0 / decay_rate), dtype=torch.float64, device=shifts.device)
    out = torch.zeros_like(shifts)  # [B, L]
    query = torch.arange(L, device=shifts.device)[:, None]  # [L, 1]
    for start in range(0, L, chunk_size):
        future = torch.arange(start, min(start + chunk_size, L), device=shifts.device)[None, :]
        dist = future - query  # [L, K']  k − t
        weights = (gamma.pow(dist.clamp(min=0).double()) * (dist >= 0)).to(shifts.dtype)
        out = out + shifts[:, start : start + chunk_size] @ weights.T  # [B, K'] @ [K', L]
    return torch.where(mask, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# FIPO weights and drop rule


def ref_influence_weights(
    future_kl, adv, log_ratio, mask, influence_min=1.0, influence_max=1.2, safety_threshold=10.0
):
    """f = clip(e^F, f_min, f_max); if A < 0 and e^δ > safety: f = clamp(f, 0.8, 1.0); 1 off-mask; detached (Eq. 7)."""
    B, T = mask.shape
    out = torch.ones(B, T, dtype=future_kl.dtype)
    for i in range(B):
        for t in range(T):
            if not _valid(mask, i, t):
                continue
            f = math.exp(_f(future_kl[i, t]))
            if influence_min is not None and f < influence_min:
                f = influence_min
            if influence_max is not None and f > influence_max:
                f = influence_max
            a = _f(_adv_at(adv, i, t))
            if (
                safety_threshold is not None
                and a < 0
                and math.exp(_f(log_ratio[i, t])) > safety_threshold
            ):
                f = min(max(f, 0.8), 1.0)
            out[i, t] = f
    return out


def ref_drop_mask(adv, log_ratio, mask, dual_clip_c):
    """keep_i = #{t : m_t, A_t < 0, e^{δ_t} > c} ≤ 1  (official FIPO sequence-drop rule; True = keep)."""
    B, T = mask.shape
    keep = []
    for i in range(B):
        count = 0
        if dual_clip_c is not None:
            for t in range(T):
                if (
                    _valid(mask, i, t)
                    and _f(_adv_at(adv, i, t)) < 0
                    and math.exp(_f(log_ratio[i, t])) > dual_clip_c
                ):
                    count += 1
        keep.append(count <= 1)
    return torch.tensor(keep, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# advantages


def _groups(n, group_size):
    if group_size < 1 or n % group_size != 0:
        raise ValueError("batch size must be a multiple of group_size")
    return [list(range(g * group_size, (g + 1) * group_size)) for g in range(n // group_size)]


def ref_group_advantages(rewards, group_size, scale="std", eps=1e-6):
    """A_i = (r_i − mean_G)/(std_G(ddof=1) + eps) ("std") or r_i − mean_G ("none"); group of 1: A = r − r = 0."""
    out = [None] * rewards.shape[0]
    for idx in _groups(rewards.shape[0], group_size):
        if len(idx) == 1:
            out[idx[0]] = rewards[idx[0]] * 0.0
            continue
        mean = _zero(rewards)
        for j in idx:
            mean = mean + rewards[j]
        mean = mean / len(idx)
        ss = _zero(rewards)
        for j in idx:
            ss = ss + (rewards[j] - mean) ** 2
        std = torch.sqrt(ss / (len(idx) - 1))
        for j in idx:
            if scale == "std":
                out[j] = (rewards[j] - mean) / (std + eps)
            elif scale == "none":
                out[j] = rewards[j] - mean
            else:
                raise ValueError(scale)
    return torch.stack(out)


def ref_rloo_advantages(rewards, group_size):
    """A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j (RLOO)."""
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    out = [None] * rewards.shape[0]
    for idx in _groups(rewards.shape[0], group_size):
        for i in idx:
            others = _zero(rewards)
            for j in idx:
                if j != i:
                    others = others + rewards[j]
            out[i] = rewards[i] - others / (len(idx) - 1)
    return torch.stack(out)


def ref_remax_advantages(rewards, greedy_rewards, mask=None):
    """[B]: A_i = r_i − r(ȳ_i) ; [B,T]: A_{i,t} = Σ_{k≥t} r_{i,k} − r(ȳ_i) on valid tokens, 0 elsewhere (ReMax)."""
    if rewards.dim() == 1:
        return torch.stack([rewards[i] - greedy_rewards[i] for i in range(rewards.shape[0])])
    B, T = rewards.shape
    rows = []
    for i in range(B):
        row = []
        for t in range(T):
            if mask is not None and not _valid(mask, i, t):
                row.append(_zero(rewards))
                continue
            s = _zero(rewards)
            for k in range(t, T):
                s = s + rewards[i, k]
            row.append(s - greedy_rewards[i])
        rows.append(row)
    return _stack_matrix(rows)


def ref_sppo_advantages(rewards, value_logits):
    """A = R − sigmoid(z), detached (SPPO Eq. 1)."""
    out = []
    for i in range(rewards.shape[0]):
        z = _f(value_logits[i])
        out.append(_f(rewards[i]) - 1.0 / (1.0 + math.exp(-z)))
    return torch.tensor(out, dtype=rewards.dtype)


def ref_gae(token_rewards, values, mask, gamma, lam):
    """On each row's valid positions t_1<…<t_n: δ_j = r_j + γV_{j+1} − V_j (V_{n+1}=0), Â_j = δ_j + γλÂ_{j+1}; returns Â+V; 0 elsewhere."""
    B, T = mask.shape
    adv_rows, ret_rows = [], []
    for i in range(B):
        adv_row = [_zero(values) for _ in range(T)]
        ret_row = [_zero(values) for _ in range(T)]
        idx = [t for t in range(T) if _valid(mask, i, t)]
        next_adv = _zero(values)
        for j in range(len(idx) - 1, -1, -1):
            t = idx[j]
            v_next = values[i, idx[j + 1]] if j + 1 < len(idx) else _zero(values)
            delta = token_rewards[i, t] + gamma * v_next - values[i, t]
            a = delta + gamma * lam * next_adv
            adv_row[t] = a
            ret_row[t] = a + values[i, t]
            next_adv = a
        adv_rows.append(adv_row)
        ret_rows.append(ret_row)
    return _stack_matrix(adv_rows), _stack_matrix(ret_rows)


def ref_token_level_rewards(scores, mask, old=None, ref=None, kl_coef=0.0, estimator="k1"):
    """r_{i,t} = −β k(old, ref)_{i,t} on valid tokens, + score_i at the last valid token (spec §0.4, §4.4)."""
    B, T = mask.shape
    use_kl = old is not None and ref is not None
    rows = []
    for i in range(B):
        idx = [t for t in range(T) if _valid(mask, i, t)]
        last = idx[-1] if idx else None
        row = []
        for t in range(T):
            r = _zero(scores)
            if _valid(mask, i, t):
                if use_kl:
                    r = r - kl_coef * _kl_one(old[i, t] - ref[i, t], estimator)
                if t == last:
                    r = r + scores[i]
            row.append(r)
        rows.append(row)
    return _stack_matrix(rows)


# ----------------------------------------------------------------------------------------------
# losses


def ref_policy_loss(
    name,
    logp,
    old,
    adv,
    mask,
    ref_logprobs=None,
    total_tokens=None,
    total_sequences=None,
    token_weights=None,
    **hparams,
):
    """loss = agg_{mask'}(ω·ℓ_clip(w, Ã)) + β·agg_{mask'}(KL); w by ratio level, Ã = A·f (FIPO),
    mask' = mask minus dropped rows, ω = ``token_weights`` [B, T] (constants; None = 1)."""
    if name not in POLICY_LOSS_PRESETS:
        raise ValueError(f"unknown policy loss {name!r}")
    cfg = dict(POLICY_LOSS_PRESETS[name])
    for key, value in hparams.items():
        if key not in _ALLOWED_HPARAMS:
            raise TypeError(f"unknown hparam {key!r}")
        cfg[key] = value
    for key in _FIPO_KEYS:
        cfg.setdefault(key, None)
    is_fipo = name == "fipo"
    level = cfg["ratio_level"]
    clamp = cfg["log_ratio_clamp"]
    B, T = mask.shape
    if level == "sequence" and adv.dim() != 1:
        raise ValueError("sequence-level ratio needs [B] advantages")

    # sequence log-ratio (unclamped) for GSPO / GSPO-token
    seq_lr = ref_sequence_log_ratio(logp, old, mask)

    # per-token log ratios and ratios on valid tokens
    logw = {}
    for i in range(B):
        for t in range(T):
            if not _valid(mask, i, t):
                continue
            if level == "token":
                logw[i, t] = _clamp_sym(logp[i, t] - old[i, t], clamp)
            elif level == "sequence":
                logw[i, t] = _clamp_sym(seq_lr[i], clamp)
            elif level == "sequence_token":
                logw[i, t] = _clamp_sym(
                    logp[i, t] - logp[i, t].detach() + seq_lr[i].detach(), clamp
                )
            else:
                raise ValueError(level)

    # advantages, possibly FIPO-weighted (weights detached)
    agg_mask = mask.clone()
    f = None
    if is_fipo:
        dl = torch.zeros(B, T, dtype=logp.dtype)
        for i in range(B):
            for t in range(T):
                if _valid(mask, i, t):
                    dl[i, t] = _f(_clamp_sym(logp[i, t] - old[i, t], clamp))
        F = ref_future_kl_scan(dl, mask, cfg["decay_rate"], cfg["dual_clip_c"])
        f = ref_influence_weights(
            F,
            adv.detach(),
            dl,
            mask,
            cfg["influence_min"],
            cfg["influence_max"],
            cfg["safety_threshold"],
        )
        if cfg["drop_dual_clipped_sequences"] and cfg["dual_clip_c"] is not None:
            keep = ref_drop_mask(adv.detach(), dl, mask, cfg["dual_clip_c"])
            for i in range(B):
                if not bool(keep[i]):
                    for t in range(T):
                        agg_mask[i, t] = False

    rows = []
    for i in range(B):
        row = []
        for t in range(T):
            if not _valid(mask, i, t):
                row.append(_zero(logp))
                continue
            a = _adv_at(adv, i, t)
            if f is not None:
                a = a * f[i, t]
            w = torch.exp(logw[i, t])
            term = ref_clipped_token_loss(
                w, a, cfg["clip_low"], cfg["clip_high"], cfg["dual_clip_c"]
            )
            if token_weights is not None:
                term = term * float(token_weights[i, t])
            row.append(term)
        rows.append(row)
    per_token = _stack_matrix(rows)
    loss = ref_aggregate(
        per_token, agg_mask, cfg["agg"], cfg["max_tokens"], total_tokens, total_sequences
    )
    if cfg["kl_coef"]:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = ref_kl(logp, ref_logprobs, mask, cfg["kl_estimator"])
        loss = loss + cfg["kl_coef"] * ref_aggregate(
            kl, agg_mask, cfg["agg"], cfg["max_tokens"], total_tokens, total_sequences
        )
    return loss


def ref_bce_value_loss(value_logits, targets, mask=None, agg="token-mean"):
    """ℓ = −[R log σ(z) + (1−R) log(1−σ(z))] = max(z,0) − zR + log(1+e^{−|z|}), aggregated (SPPO Eq. 2)."""
    z2 = value_logits if value_logits.dim() == 2 else value_logits.unsqueeze(1)
    y2 = targets if targets.dim() == 2 else targets.unsqueeze(1)
    m2 = (
        torch.ones(z2.shape, dtype=torch.bool)
        if mask is None
        else (mask if mask.dim() == 2 else mask.unsqueeze(1))
    )
    rows = []
    for i in range(z2.shape[0]):
        row = []
        for t in range(z2.shape[1]):
            z = z2[i, t]
            y = y2[i, t]
            pos = z if z > 0 else z * 0.0
            row.append(pos - z * y + torch.log(1.0 + torch.exp(-torch.abs(z))))
        rows.append(row)
    return ref_aggregate(_stack_matrix(rows), m2, agg)


def ref_clipped_value_loss(values, old_values, returns, mask, clip=0.5, agg="token-mean"):
    """0.5 · agg(max((V − G)², (clip(V, V_old − ε, V_old + ε) − G)²)); clip=None → 0.5 · agg((V − G)²)."""
    rows = []
    for i in range(values.shape[0]):
        row = []
        for t in range(values.shape[1]):
            v = values[i, t]
            g = returns[i, t]
            l1 = (v - g) ** 2
            if clip is None:
                row.append(l1)
                continue
            lo = old_values[i, t] - clip
            hi = old_values[i, t] + clip
            if v < lo:
                vc = v * 0.0 + lo.detach()
            elif v > hi:
                vc = v * 0.0 + hi.detach()
            else:
                vc = v
            l2 = (vc - g) ** 2
            row.append(l1 if l1 >= l2 else l2)
        rows.append(row)
    return 0.5 * ref_aggregate(_stack_matrix(rows), mask, agg)


def mismatch_weights_ref(old_logprobs, sampler_logprobs, mask, *, level, mode, cap):
    """Train–inference mismatch weights, one row and token at a time (plain floats).

    token: ρ_t = π_old/μ; sequence: ρ_i = Π_t ρ_t over valid tokens; sequence_mean:
    ρ_i = (Π_t ρ_t)^(1/n_i), n_i the row's valid tokens. truncate: min(ρ, C); mask: ρ if ρ ≤ C
    else 0. Padding gets 0. Computed with math.exp in float64, guarding the sequence product's
    overflow by comparing logs.
    """
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        seq_log, n = 0.0, 0
        for t in range(T):
            if mask[i, t]:
                seq_log += float(old_logprobs[i, t]) - float(sampler_logprobs[i, t])
                n += 1
        for t in range(T):
            if not mask[i, t]:
                continue
            if level == "token":
                log_rho = float(old_logprobs[i, t]) - float(sampler_logprobs[i, t])
            elif level == "sequence":
                log_rho = seq_log
            else:
                log_rho = seq_log / n
            if log_rho > math.log(cap):
                out[i, t] = cap if mode == "truncate" else 0.0
            else:
                out[i, t] = math.exp(log_rho)
    return out


def ref_decoupled_policy_loss(
    name,
    logp,
    prox,
    behaviour,
    adv,
    mask,
    *,
    correction="truncate",
    level=None,
    cap=2.0,
    ref_logprobs=None,
    total_tokens=None,
    total_sequences=None,
    **hparams,
):
    """The three-policy loss: ref_policy_loss against π_prox with ω = trunc/mask(π_prox/μ).

    The default level matches the ratio: per token for token ratios, the length-normalised
    sequence ratio (π_prox/μ)^(1/|y|) for GSPO and GSPO-token. correction="none": ω = 1.
    """
    weights = None
    if correction != "none":
        if level is None:
            ratio_level = hparams.get("ratio_level", POLICY_LOSS_PRESETS[name]["ratio_level"])
            level = "token" if ratio_level == "token" else "sequence_mean"
        weights = mismatch_weights_ref(prox, behaviour, mask, level=level, mode=correction, cap=cap)
    return ref_policy_loss(
        name,
        logp,
        prox,
        adv,
        mask,
        ref_logprobs=ref_logprobs,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        token_weights=weights,
        **hparams,
    )


def ref_routing_churn(old, new, valid):
    """Per layer: (share of valid tokens whose top-k *set* changed, mean |E_new \\ E_old| / k).

    old, new: nested lists [layers][tokens][k] of expert ids; valid: [tokens] bools.
    """
    changed, moved = [], []
    for old_layer, new_layer in zip(old, new, strict=True):
        n = c = m = 0
        for o, w, ok in zip(old_layer, new_layer, valid, strict=True):
            if not ok:
                continue
            n += 1
            c += set(o) != set(w)
            m += len(set(w) - set(o)) / len(w)
        changed.append(c / n)
        moved.append(m / n)
    return changed, moved
