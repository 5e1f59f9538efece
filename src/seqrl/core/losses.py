"""Policy and value losses: ``policy_loss(name, ...)`` → ``LossOutput(loss, metrics)``.

Every policy loss is one clipped surrogate (:func:`seqrl.core.ratios.clipped_surrogate`) with a
few independent choices, and each algorithm name is a preset of them (:data:`POLICY_LOSSES`):

- ratio level: ``token`` w_t = π_θ/π_old (PPO, GRPO, DAPO, SPPO, FIPO, RLOO, ReMax);
  ``sequence`` s_i = exp(mean_t log π_θ/π_old) broadcast to the tokens (GSPO Eq. 7);
  ``sequence_token`` sg[s_i]·π_θ/sg[π_θ] (GSPO-token Eq. 14);
- clip range [1 − clip_low, 1 + clip_high] and optional dual clip c;
- aggregation (:mod:`seqrl.core.reduce`) and Dr. GRPO's ``max_tokens``;
- KL to a reference in the loss, ``loss += kl_coef · agg(k(logp, ref_logprobs))``;
- FIPO's detached future-KL influence weights on the advantage, plus its sequence-drop rule.

:func:`decoupled_policy_loss` is the same loss with three policies (stale samples from an
asynchronous rollout worker): the clip acts on π_θ / π_prox and a truncated importance weight
corrects for π_prox / μ.

All inputs are [B, T] (``advantages`` may be [B]); the loss is minimised (loss = −J).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from seqrl.core.advantages import broadcast_to_tokens
from seqrl.core.fipo import dual_clip_drop_mask, influence_weights
from seqrl.core.kl import KL_ESTIMATORS, KLEstimator, kl_estimate
from seqrl.core.masks import check_mask, masked_extreme, masked_mean
from seqrl.core.mismatch import MismatchLevel, mismatch_log_ratio, mismatch_weights
from seqrl.core.ratios import (
    clip_masks,
    clipped_surrogate,
    gspo_token_log_ratio,
    sequence_log_ratio,
    token_log_ratio,
)
from seqrl.core.reduce import AGG_MODES, AggMode, aggregate
from seqrl.core.returns import future_kl

RatioLevel = Literal["token", "sequence", "sequence_token"]
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token")


@dataclass(frozen=True)
class LossOutput:
    """A loss to minimise (0-d tensor) and its metrics (detached 0-d tensors, namespaced keys).

    ``denominator`` is None when ``loss`` is already normalised. Otherwise ``loss`` and its
    ``loss/*`` metrics are sums over this call's rows, and the caller divides the gradient it
    accumulated over a minibatch (and those metrics) by the sum of the minibatch's
    denominators: a loss whose normaliser depends on every row's forward (FIPO's drop rule)
    can only be normalised once the whole minibatch has been seen.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    denominator: Tensor | None = None


@dataclass(frozen=True)
class PolicyLossConfig:
    """The independent choices behind a policy loss; names are presets of these fields."""

    ratio_level: RatioLevel = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = None  # Ye et al. 2020; None = off
    agg: AggMode = "token-mean"
    max_tokens: float | None = None  # Dr. GRPO's constant normaliser
    kl_coef: float = 0.0  # in-loss KL weight β (needs ref_logprobs when > 0)
    kl_estimator: KLEstimator = "k3"
    log_ratio_clamp: float | None = 20.0  # numerical guard on log-ratios before exp; None = off
    future_kl_weights: bool = False  # FIPO
    decay_rate: float = 32.0  # FIPO τ, γ = 2^(−1/τ)
    influence_min: float | None = 1.0  # FIPO weight interval [influence_min, influence_max]
    influence_max: float | None = 1.2
    safety_threshold: float | None = 10.0  # FIPO safety rule on ratio; None = off
    drop_dual_clipped_sequences: bool = False  # FIPO official-code sequence drop


FIPO_FIELDS = frozenset(
    {
        "decay_rate",
        "influence_min",
        "influence_max",
        "safety_threshold",
        "drop_dual_clipped_sequences",
    }
)

_TOKEN = PolicyLossConfig()
_VERL_VANILLA = dataclasses.replace(_TOKEN, dual_clip_c=3.0)  # verl's vanilla loss: dual clip c = 3
_GSPO = dataclasses.replace(
    _TOKEN,
    ratio_level="sequence",
    clip_low=3e-4,
    clip_high=4e-4,
    agg="seq-mean-token-mean",
    log_ratio_clamp=10.0,
)
_DAPO = dataclasses.replace(_TOKEN, clip_high=0.28, dual_clip_c=10.0)


@dataclass(frozen=True)
class LossPreset:
    """One policy-loss name: its defaults, a one-line summary and the paper it follows."""

    defaults: PolicyLossConfig
    summary: str
    paper: str


# The catalogue of policy-loss names: ``seqrl presets``, its docs table and config hints read it.
POLICY_LOSSES: dict[str, LossPreset] = {
    "ppo": LossPreset(
        _VERL_VANILLA,
        "token-level PPO clipped surrogate as verl runs it: ε = 0.2, dual clip 3, token-mean "
        "(pair with GAE and a token critic)",
        "arXiv 1707.06347",
    ),
    "grpo": LossPreset(
        dataclasses.replace(_TOKEN, agg="seq-mean-token-mean", kl_coef=0.04),
        "group-normalised advantages, per-sequence mean (Eq. 3), k3 KL in the loss with β = 0.04",
        "arXiv 2402.03300",
    ),
    "dapo": LossPreset(
        _DAPO,
        "clip-higher [0.2, 0.28], token-mean, dual clip 10 (from verl's script)",
        "arXiv 2503.14476",
    ),
    "dr_grpo": LossPreset(
        dataclasses.replace(_TOKEN, agg="seq-mean-token-sum-norm"),
        "group-centred advantages, token sum / MAX_TOKENS per sequence, mean over sequences",
        "arXiv 2503.20783",
    ),
    "gspo": LossPreset(
        _GSPO,
        "sequence-level length-normalised ratio, clip [3e-4, 4e-4] (§5.1), per-sequence mean "
        "(Eq. 5)",
        "arXiv 2507.18071",
    ),
    "gspo_token": LossPreset(
        dataclasses.replace(_GSPO, ratio_level="sequence_token"),
        "GSPO-token (Eqs. 13–17): sg[s_i]·π/sg[π] token ratios for per-token advantages, GSPO's "
        "clip and aggregation",
        "arXiv 2507.18071",
    ),
    "sppo": LossPreset(
        _VERL_VANILLA,
        "token PPO on R − V(prompt) from a scalar BCE critic, one sample per prompt (Eq. 3); "
        "verl's vanilla defaults",
        "arXiv 2604.08865",
    ),
    "fipo": LossPreset(
        dataclasses.replace(_DAPO, future_kl_weights=True, drop_dual_clipped_sequences=True),
        "DAPO with detached future-KL influence weights on the advantage; official 32B settings",
        "arXiv 2603.19835",
    ),
    "rloo": LossPreset(
        _VERL_VANILLA, "leave-one-out baseline, verl's clipped form", "arXiv 2402.14740"
    ),
    "remax": LossPreset(
        _VERL_VANILLA, "greedy-decoding baseline, verl's clipped form", "arXiv 2310.10505"
    ),
}
POLICY_LOSS_DEFAULTS: dict[str, PolicyLossConfig] = {
    name: preset.defaults for name, preset in POLICY_LOSSES.items()
}
POLICY_LOSS_NAMES: tuple[str, ...] = tuple(POLICY_LOSSES)


# Names other frameworks use for our hyperparameters (verl, TRL, ms-swift), for error hints.
FOREIGN_NAMES = {
    "loss_agg_mode": "agg",
    "loss_type": "the policy_loss name",
    "clip_ratio": "clip_low and clip_high",
    "clip_ratio_low": "clip_low",
    "clip_ratio_high": "clip_high",
    "clip_ratio_c": "dual_clip_c",
    "epsilon": "clip_low",
    "epsilon_low": "clip_low",
    "epsilon_high": "clip_high",
    "delta": "dual_clip_c",
    "beta": "kl_coef",
    "kl_loss_coef": "kl_coef",
    "kl_loss_type": "kl_estimator",
    "fipo_decay_rate": "decay_rate",
    "fipo_safety_threshold": "safety_threshold",
}


def _closest(word: str, options) -> str:
    if word in FOREIGN_NAMES:
        return f"; seqrl calls it {FOREIGN_NAMES[word]!r}"
    by_lower = {o.lower(): o for o in options}
    if word.lower() in by_lower:
        return f"; did you mean {by_lower[word.lower()]!r}?"
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f"; did you mean {by_lower[match[0]]!r}?" if match else ""


def _normalizer(agg: str, total_tokens, total_sequences) -> dict:
    """The mini-batch normaliser the aggregation mode uses (both may be given; see reduce.py)."""
    if agg == "token-mean":
        return {"total_tokens": total_tokens}
    return {"total_sequences": total_sequences}


def resolve_policy_loss_config(name: str, **hparams) -> PolicyLossConfig:
    """The preset ``name`` with explicit ``hparams`` overriding it, validated."""
    if name not in POLICY_LOSS_DEFAULTS:
        raise ValueError(
            f"unknown policy loss {name!r}{_closest(name, POLICY_LOSS_DEFAULTS)} "
            f"(choose one of {', '.join(POLICY_LOSS_NAMES)})"
        )
    valid = {f.name for f in dataclasses.fields(PolicyLossConfig)}
    for key in hparams:
        if key not in valid:
            raise TypeError(f"unknown hyperparameter {key!r} for policy_loss{_closest(key, valid)}")
    cfg = dataclasses.replace(POLICY_LOSS_DEFAULTS[name], **hparams)
    if not cfg.future_kl_weights and FIPO_FIELDS & hparams.keys():
        bad = sorted(FIPO_FIELDS & hparams.keys())
        raise TypeError(f"{', '.join(bad)} only apply to FIPO (name='fipo'), not {name!r}")
    if cfg.ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {cfg.ratio_level!r}")
    if cfg.agg not in AGG_MODES:
        raise ValueError(
            f"agg must be one of {AGG_MODES}, got {cfg.agg!r}{_closest(cfg.agg, AGG_MODES)}"
        )
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {cfg.kl_estimator!r}")
    if not (0 <= cfg.clip_low < 1 and cfg.clip_high >= 0):
        raise ValueError(
            f"need 0 ≤ clip_low < 1 and clip_high ≥ 0, got {cfg.clip_low}, {cfg.clip_high}"
        )
    if cfg.dual_clip_c is not None and cfg.dual_clip_c <= 1 + cfg.clip_high:
        raise ValueError(
            f"dual_clip_c must exceed 1 + clip_high = {1 + cfg.clip_high}, got {cfg.dual_clip_c}"
        )
    if cfg.drop_dual_clipped_sequences and cfg.dual_clip_c is None:
        raise ValueError("drop_dual_clipped_sequences needs dual_clip_c (the ratio threshold c)")
    if cfg.agg == "seq-mean-token-sum-norm" and cfg.max_tokens is None:
        raise ValueError(
            f"{name!r} aggregates with seq-mean-token-sum-norm and needs max_tokens, the "
            "training-wide generation budget (Dr. GRPO's MAX_TOKENS)"
        )
    return cfg


def _check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    check_mask(mask, logprobs)
    for label, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(
                f"{label} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)}"
            )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")
    if cfg.ratio_level == "sequence" and advantages.dim() != 1:
        raise ValueError(
            "a sequence-level ratio (gspo) needs one advantage per sequence [B]; "
            "use 'gspo_token' for per-token advantages"
        )
    if cfg.kl_coef and ref_logprobs is None:
        raise ValueError(
            f"kl_coef={cfg.kl_coef} needs ref_logprobs from a reference model; "
            "pass them, or set kl_coef=0 to train without the KL term"
        )


def _log_ratio(logprobs, old_logprobs, mask, cfg: PolicyLossConfig) -> Tensor:
    """log w [B, T] at the configured ratio level (0 on padding)."""
    if cfg.ratio_level == "token":
        return token_log_ratio(logprobs, old_logprobs, mask, clamp=cfg.log_ratio_clamp)
    if cfg.ratio_level == "sequence_token":
        return gspo_token_log_ratio(logprobs, old_logprobs, mask, clamp=cfg.log_ratio_clamp)
    seq = sequence_log_ratio(logprobs, old_logprobs, mask)  # [B]
    if cfg.log_ratio_clamp is not None:
        seq = seq.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    return broadcast_to_tokens(seq, mask)  # [B, T]


def policy_loss(
    name: str,
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    total_tokens: Tensor | float | None = None,
    total_sequences: Tensor | float | None = None,
    is_weights: Tensor | None = None,
    **hparams,
) -> LossOutput:
    """Clipped policy-gradient loss of algorithm ``name`` (a preset; ``hparams`` override it).

    The preset and overrides are resolved by :func:`resolve_policy_loss_config`, then
    :func:`clipped_policy_loss` computes the loss (a training loop resolves once per run and
    calls that directly).
    """
    return clipped_policy_loss(
        resolve_policy_loss_config(name, **hparams),
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        is_weights=is_weights,
    )


def clipped_policy_loss(
    cfg: PolicyLossConfig,
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    total_tokens: Tensor | float | None = None,
    total_sequences: Tensor | float | None = None,
    is_weights: Tensor | None = None,
    defer_normalizer: bool = False,
) -> LossOutput:
    """The clipped policy-gradient loss of a resolved :class:`PolicyLossConfig`.

        w      = token ratio, GSPO's s_i, or GSPO-token's sg[s_i]·π/sg[π]   (ratio_level)
        Ã_t    = Â_t · f_t   (FIPO, f detached; f ≡ 1 otherwise)
        ℓ_t    = max(−Ã w, −Ã clip(w, 1 − ε_low, 1 + ε_high));  min(ℓ_t, −Ã c) where Ã < 0 (dual clip)
        loss   = agg(ω ⊙ ℓ) + β · agg(k(logp, ref))

    ``is_weights`` ω [B, T] (detached; None = 1) are train–inference mismatch weights from
    :func:`seqrl.core.mismatch_weights` (truncated or masked importance sampling); they scale
    the policy term only, and zero-weight tokens still count in the normaliser.

    logprobs [B, T] carry the gradient; old_logprobs / ref_logprobs [B, T] and advantages [B] or
    [B, T] are treated as constants. ``total_tokens`` / ``total_sequences`` are the optimiser
    mini-batch's normalisers when this call sees one micro-batch (spec §0.3); pass both, e.g.
    from :func:`seqrl.core.normalizers`, and the aggregation uses the one it needs.

    FIPO's sequence-drop rule removes rows from the denominator, and which rows go is only known
    in each micro-batch's forward pass. Called on a whole minibatch (no normaliser passed) the
    loss divides by its own kept tokens (or sequences); a given normaliser is used as given. With
    ``defer_normalizer=True`` a loss whose normaliser depends on its forward (the drop rule)
    instead returns the undivided sum and its local kept count as ``LossOutput.denominator``,
    for the caller to divide by after accumulating the minibatch (exact for any micro-batching
    and number of processes); other losses ignore the flag.
    Metrics: ``loss/policy``, ``loss/kl``, ``policy/clip_frac{,_low,_high}``,
    ``policy/dual_clip_frac``, ``policy/ratio_{mean,min,max}``, ``policy/kl_old``,
    ``policy/seq_clip_frac`` (GSPO), ``fipo/*`` (FIPO).
    """
    _check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg)
    old_logprobs = old_logprobs.detach()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = broadcast_to_tokens(adv, mask)  # [B, T]
    adv = torch.where(mask, adv, torch.zeros_like(adv))
    log_ratio = _log_ratio(logprobs, old_logprobs, mask, cfg)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    loss_mask = mask
    metrics: dict[str, Tensor] = {}
    norm = _normalizer(cfg.agg, total_tokens, total_sequences)
    denominator = None

    if cfg.future_kl_weights:
        weights, fipo_metrics = _fipo_weights(log_ratio, adv, mask, cfg)
        adv = adv * weights  # [B, T]  Ã = Â·f, f detached
        metrics.update(fipo_metrics)
        if cfg.drop_dual_clipped_sequences:
            keep = dual_clip_drop_mask(adv, log_ratio, mask, cfg.dual_clip_c)  # [B]
            loss_mask = mask & keep[:, None]
            metrics["fipo/dropped_seqs"] = (~keep & mask.any(-1)).sum().to(ratio.dtype)
            metrics["fipo/kept_tokens"] = loss_mask.sum().to(ratio.dtype)
            if defer_normalizer:  # sums; the caller divides by the minibatch's Σ denominators
                denominator = _local_normalizer(cfg.agg, loss_mask).to(ratio.dtype)
                norm = dict.fromkeys(norm, 1)

    per_token = clipped_surrogate(
        ratio, adv, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c
    )  # [B, T]
    if is_weights is not None:
        if is_weights.shape != per_token.shape:
            raise ValueError(
                f"is_weights has shape {tuple(is_weights.shape)}, expected {tuple(per_token.shape)}"
            )
        per_token = per_token * is_weights.detach()  # [B, T]
    norm["max_tokens"] = cfg.max_tokens
    policy = aggregate(per_token, loss_mask, cfg.agg, **norm)
    loss = policy
    metrics["loss/policy"] = policy
    if ref_logprobs is not None:
        kl = aggregate(
            kl_estimate(logprobs, ref_logprobs.detach(), mask, cfg.kl_estimator),
            loss_mask,
            cfg.agg,
            **norm,
        )
        if cfg.kl_coef:  # with β = 0 the KL is only reported, so an inf there cannot reach the loss
            loss = loss + cfg.kl_coef * kl
        metrics["loss/kl"] = kl
    metrics.update(_ratio_metrics(ratio, adv, mask, logprobs, old_logprobs, cfg))
    return LossOutput(
        loss=loss, metrics={k: v.detach() for k, v in metrics.items()}, denominator=denominator
    )


def behaviour_level(ratio_level: str) -> MismatchLevel:
    """The level of the π_prox / μ correction that matches a loss's ratio level.

    token ratios (PPO, GRPO, DAPO, …) → ``token``; GSPO's and GSPO-token's sequence ratio →
    ``sequence_mean``, the same length-normalised ratio the clip acts on.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    return "token" if ratio_level == "token" else "sequence_mean"


def decoupled_policy_loss(
    cfg: PolicyLossConfig,
    *,
    logprobs: Tensor,
    prox_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    correction: Literal["none", "truncate", "mask"] = "truncate",
    level: MismatchLevel | None = None,
    cap: float = 2.0,
    ref_logprobs: Tensor | None = None,
    total_tokens: Tensor | float | None = None,
    total_sequences: Tensor | float | None = None,
    defer_normalizer: bool = False,
) -> LossOutput:
    """The three-policy (decoupled) clipped loss for samples drawn from an older policy.

    μ (``behaviour_logprobs``) sampled the tokens (an asynchronous rollout worker's weights,
    k versions old); π_prox (``prox_logprobs``) is the trainer's policy when the step began,
    recomputed; π_θ (``logprobs``) is being optimised. The clip keeps π_θ near π_prox, and a
    detached importance weight moves the expectation from μ to π_prox
    (Hilton et al. 2022, arXiv 2110.00641; AReaL, arXiv 2505.24298):

        w     = π_θ / π_prox at the loss's ratio level (token, GSPO's s_i, GSPO-token)
        ρ     = π_prox / μ at ``level`` (default :func:`behaviour_level`: per token for token
                ratios; per sequence, length-normalised, for GSPO:
                ρ_i = exp((1/|y_i|) Σ_t (log π_prox − log μ)))
        ω     = min(ρ, C) (truncate) or ρ · 1[ρ ≤ C] (mask), detached;  ω ≡ 1 for "none"
        ℓ_t   = max(−Ã w, −Ã clip(w, 1 − ε_low, 1 + ε_high))  (+ dual clip), Ã = Â · f
        loss  = agg(ω ⊙ ℓ) + β · agg(k(logp, ref))

    FIPO's future-KL (hence f and its drop rule) is taken on log π_θ − log π_prox: the drift of
    this update from where it started, which it controls, not the samples' age, which ω handles.
    With μ = π_prox (synchronous, no train–inference gap) ρ = 1, ω = 1 and the loss is
    :func:`clipped_policy_loss` exactly. All log-prob tensors [B, T]; ``advantages`` [B] or
    [B, T]; the normaliser arguments as in :func:`clipped_policy_loss`. Metrics: those of
    :func:`clipped_policy_loss`, plus with a correction ``mismatch/weight_mean`` (mean ω over
    tokens) and ``mismatch/weight_capped_frac`` (tokens whose ρ, at ``level``, exceeds C).
    """
    if correction not in ("none", "truncate", "mask"):
        raise ValueError(f"correction must be none, truncate or mask, got {correction!r}")
    weights = None  # [B, T]
    level = level or behaviour_level(cfg.ratio_level)
    if correction != "none":
        weights = mismatch_weights(
            prox_logprobs, behaviour_logprobs, mask, level=level, mode=correction, cap=cap
        )
    out = clipped_policy_loss(
        cfg,
        logprobs=logprobs,
        old_logprobs=prox_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        is_weights=weights,
        defer_normalizer=defer_normalizer,
    )
    if weights is not None:
        with torch.no_grad():
            log_rho = mismatch_log_ratio(prox_logprobs, behaviour_logprobs, mask, level=level)
            if level != "token":
                log_rho = log_rho[:, None].expand_as(mask)  # [B, T]
            capped = (log_rho > math.log(cap)).to(weights.dtype)  # ρ > C: truncated or masked
            out.metrics["mismatch/weight_mean"] = masked_mean(weights, mask)
            out.metrics["mismatch/weight_capped_frac"] = masked_mean(capped, mask)
    return out


def _local_normalizer(agg: str, mask: Tensor) -> Tensor:
    """What :func:`aggregate` divides by without a minibatch normaliser: tokens or sequences."""
    if agg == "token-mean":
        return mask.sum()
    return (mask.sum(dim=-1) > 0).sum()


def _fipo_weights(log_ratio, adv, mask, cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """FIPO's f [B, T] (detached) and its statistics."""
    delta = log_ratio.detach()
    fkl = future_kl(delta, mask, decay_rate=cfg.decay_rate, dual_clip_c=cfg.dual_clip_c)  # [B, T]
    weights = influence_weights(
        fkl,
        adv,
        delta,
        mask,
        influence_min=cfg.influence_min,
        influence_max=cfg.influence_max,
        safety_threshold=cfg.safety_threshold,
    )  # [B, T]
    dtype = weights.dtype
    stats = {
        "fipo/weight_mean": masked_mean(weights, mask),
        "fipo/weight_min": masked_extreme(weights, mask, torch.amin),
        "fipo/weight_max": masked_extreme(weights, mask, torch.amax),
        "fipo/weight_above_1_frac": masked_mean((weights > 1).to(dtype), mask),
        "fipo/future_kl_mean": masked_mean(fkl, mask),
    }
    if cfg.influence_min is not None:
        stats["fipo/weight_at_min_frac"] = masked_mean(
            (weights <= cfg.influence_min).to(dtype), mask
        )
    if cfg.influence_max is not None:
        stats["fipo/weight_at_max_frac"] = masked_mean(
            (weights >= cfg.influence_max).to(dtype), mask
        )
    if cfg.safety_threshold is not None:
        risky = mask & (adv < 0) & (delta > math.log(cfg.safety_threshold))
        stats["fipo/safety_frac"] = masked_mean(risky.to(dtype), mask)
    return weights, stats


def _ratio_metrics(
    ratio, adv, mask, logprobs, old_logprobs, cfg: PolicyLossConfig
) -> dict[str, Tensor]:
    with torch.no_grad():
        dtype = ratio.dtype
        clipped = clip_masks(
            ratio,
            adv,
            mask,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip_c=cfg.dual_clip_c,
        )
        frac = {k: masked_mean(v.to(dtype), mask) for k, v in clipped.items()}
        out = {
            "policy/clip_frac": frac["high"] + frac["low"],
            "policy/clip_frac_low": frac["low"],
            "policy/clip_frac_high": frac["high"],
            "policy/dual_clip_frac": frac["dual"],
            "policy/ratio_mean": masked_mean(ratio, mask),
            "policy/ratio_min": masked_extreme(ratio, mask, torch.amin),
            "policy/ratio_max": masked_extreme(ratio, mask, torch.amax),
            "policy/kl_old": masked_mean(old_logprobs - logprobs, mask),
        }
        if cfg.ratio_level != "token":
            seq_clipped = (clipped["high"] | clipped["low"]).any(dim=-1)  # [B]
            nonempty = mask.any(dim=-1)
            out["policy/seq_clip_frac"] = masked_mean(seq_clipped.to(dtype), nonempty)
        return out


def bce_value_loss(
    value_logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    agg: AggMode = "token-mean",
    total_tokens: Tensor | float | None = None,
    total_sequences: Tensor | float | None = None,
) -> LossOutput:
    """SPPO's critic loss (Eq. 2): BCE-with-logits of V = sigmoid(z) against the 0/1 reward.

        L_V = −mean[ R·log σ(z) + (1 − R)·log(1 − σ(z)) ],     ∂L/∂z = (σ(z) − R)/N

    value_logits, targets: [B] (one logit per prompt, mean over the batch; ``total_sequences``
    overrides B) or [B, T] with ``mask`` (a token critic trained with BCE, aggregated by ``agg``).
    """
    if value_logits.shape != targets.shape:
        raise ValueError(
            f"value_logits {tuple(value_logits.shape)} and targets {tuple(targets.shape)} differ"
        )
    targets = targets.detach().to(value_logits.dtype)
    if value_logits.dim() == 1:
        if mask is not None:
            raise ValueError("a scalar critic's logits [B] take no mask")
        per_seq = F.binary_cross_entropy_with_logits(value_logits, targets, reduction="none")  # [B]
        denom = max(value_logits.shape[0], 1) if total_sequences is None else total_sequences
        loss = per_seq.sum() / denom
        valid = torch.ones_like(value_logits, dtype=torch.bool)
    else:
        if mask is None:
            raise ValueError("token-level value logits [B, T] need the response mask")
        per_tok = F.binary_cross_entropy_with_logits(
            value_logits, targets, reduction="none"
        )  # [B, T]
        loss = aggregate(per_tok, mask, agg, **_normalizer(agg, total_tokens, total_sequences))
        valid = mask
    with torch.no_grad():
        metrics = {
            "critic/loss": loss.detach(),
            "critic/value_mean": masked_mean(torch.sigmoid(value_logits), valid),
            "critic/target_mean": masked_mean(targets, valid),
        }
    return LossOutput(loss=loss, metrics=metrics)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.5,
    agg: AggMode = "token-mean",
    total_tokens: Tensor | float | None = None,
    total_sequences: Tensor | float | None = None,
) -> LossOutput:
    """PPO's clipped value loss (spec §4.4): 0.5 · agg(max((V − G)², (clip(V, V_old ± ε_v) − G)²)).

    values [B, T] carry the gradient; old_values, returns [B, T] are constants; ``clip`` = ε_v
    (verl 0.5), None for the plain squared error.
    """
    check_mask(mask, values)
    old_values, returns = old_values.detach(), returns.detach()
    err = (values - returns).square()  # [B, T]
    if clip is None:
        per_tok, clipped_frac = err, torch.zeros((), dtype=values.dtype)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)  # [B, T]
        err_clipped = (v_clipped - returns).square()
        per_tok = torch.maximum(err, err_clipped)
        clipped_frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    loss = 0.5 * aggregate(per_tok, mask, agg, **_normalizer(agg, total_tokens, total_sequences))
    metrics = {
        "critic/loss": loss.detach(),
        "critic/value_clip_frac": clipped_frac.detach(),
        "critic/value_mean": masked_mean(values.detach(), mask),
    }
    return LossOutput(loss=loss, metrics=metrics)
