"""seqrl.core: the pure tensor maths of GSPO, SPPO, FIPO and their baselines.

Explicit tensors in, tensors out: no model, no config object, no I/O, no ``.item()``, no
``torch.distributed``. Each function's docstring carries its equation and paper.

Shape letters used in every docstring and comment:
    P  prompts in a batch            G  samples (responses) per prompt
    B  sequences, B = P·G            T  response tokens (padded width)
    L  prompt + response tokens      V  vocabulary size
Rows i·G … i·G + G − 1 share prompt i. ``mask`` / ``response_mask`` is bool [B, T] and True
means "this token was sampled by the policy and counts"; values at False positions never reach
a sum or an ``exp``.
"""

from seqrl.core.advantages import (
    broadcast_to_tokens,
    gae_advantages,
    group_advantages,
    group_centered_advantages,
    remax_advantages,
    reward_kl_penalty,
    rloo_advantages,
    sppo_advantages,
    token_level_rewards,
)
from seqrl.core.fipo import FIPO_PRESETS, dual_clip_drop_mask, influence_weights
from seqrl.core.kl import KL_ESTIMATORS, kl_estimate
from seqrl.core.logprobs import token_entropy, token_logprobs
from seqrl.core.losses import (
    POLICY_LOSS_DEFAULTS,
    POLICY_LOSS_NAMES,
    POLICY_LOSSES,
    LossOutput,
    LossPreset,
    PolicyLossConfig,
    bce_value_loss,
    behaviour_level,
    clipped_policy_loss,
    clipped_value_loss,
    decoupled_policy_loss,
    policy_loss,
    resolve_policy_loss_config,
)
from seqrl.core.masks import (
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_lengths,
)
from seqrl.core.mismatch import (
    MISMATCH_LEVELS,
    MISMATCH_MODES,
    mismatch_log_ratio,
    mismatch_metrics,
    mismatch_weights,
)
from seqrl.core.ratios import (
    clip_masks,
    clipped_surrogate,
    gspo_token_log_ratio,
    sequence_log_ratio,
    token_log_ratio,
)
from seqrl.core.reduce import AGG_MODES, aggregate, normalizers
from seqrl.core.returns import (
    decay_from_rate,
    discounted_reverse_cumsum,
    future_kl,
)
from seqrl.core.routing import (
    expert_load,
    load_cv,
    routing_expert_change,
    routing_set_changed,
)
from seqrl.core.shaping import mixed_group_mask, overlong_filter_mask, soft_overlong_penalty

__all__ = [
    "AGG_MODES",
    "FIPO_PRESETS",
    "KL_ESTIMATORS",
    "MISMATCH_LEVELS",
    "MISMATCH_MODES",
    "POLICY_LOSSES",
    "POLICY_LOSS_DEFAULTS",
    "POLICY_LOSS_NAMES",
    "LossOutput",
    "LossPreset",
    "PolicyLossConfig",
    "aggregate",
    "bce_value_loss",
    "behaviour_level",
    "broadcast_to_tokens",
    "clip_masks",
    "clipped_policy_loss",
    "clipped_surrogate",
    "clipped_value_loss",
    "decay_from_rate",
    "decoupled_policy_loss",
    "discounted_reverse_cumsum",
    "dual_clip_drop_mask",
    "expert_load",
    "future_kl",
    "gae_advantages",
    "group_advantages",
    "group_centered_advantages",
    "gspo_token_log_ratio",
    "influence_weights",
    "kl_estimate",
    "load_cv",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mismatch_log_ratio",
    "mismatch_metrics",
    "mismatch_weights",
    "mixed_group_mask",
    "normalizers",
    "overlong_filter_mask",
    "policy_loss",
    "remax_advantages",
    "resolve_policy_loss_config",
    "reward_kl_penalty",
    "rloo_advantages",
    "routing_expert_change",
    "routing_set_changed",
    "sequence_lengths",
    "sequence_log_ratio",
    "soft_overlong_penalty",
    "sppo_advantages",
    "token_entropy",
    "token_level_rewards",
    "token_log_ratio",
    "token_logprobs",
]
