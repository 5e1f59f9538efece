"""Checks across config sections: problems that make a config invalid, and warnings.

:func:`cross_field_problems` runs when a :class:`~seqrl.config.schema.RunConfig` is validated
(each problem becomes a :class:`~seqrl.config.messages.ConfigError` line); :func:`validate_warnings`
lists settings that run but are probably not what was meant (the CLI prints them). Every message
names its dotted keys and, where there is one, the setting that fixes it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from seqrl.core.fipo import FIPO_PRESETS
from seqrl.core.losses import POLICY_LOSS_DEFAULTS, resolve_policy_loss_config

if TYPE_CHECKING:  # annotations only: the schema imports this module
    from seqrl.config.schema import RunConfig, TaskConfig

# Policy-loss name / advantage estimator → the critic kind it learns its advantage from.
CRITIC_ALGOS = {"sppo": "scalar", "ppo": "token"}
CRITIC_ADVANTAGES = {"sppo": "scalar", "gae": "token"}
_CRITIC_WHAT = {
    "scalar": "a scalar prompt critic, A = R − V(prompt)",
    "token": "GAE over a token critic",
}


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Checks that span sections; each message names its dotted keys."""
    if cfg.algo.fipo_preset is not None and cfg.algo.name != "fipo":
        return [
            f"algo.fipo_preset={cfg.algo.fipo_preset!r} only applies to algo.name='fipo', "
            f"not {cfg.algo.name!r}; set algo.fipo_preset=null"
        ]
    problems = _loss_problems(cfg) + _shaping_problems(cfg) + _critic_problems(cfg)
    if cfg.task.name != "file" and ":" in cfg.task.reward:
        problems.append(
            f"task.reward={cfg.task.reward!r} applies to task.name='file' (your data); the "
            f"built-in task {cfg.task.name!r} scores with its own exact verifier"
        )
    if cfg.task.name == "file" and not cfg.task.train_file:
        problems.append(
            "task.name='file' needs task.train_file (and task.test_file for the held-out "
            "problems, or a tenth of the train file is held out)"
        )
    if cfg.rollout.engine == "vllm" and cfg.device == "cpu":
        problems.append(
            "rollout.engine='vllm' needs a CUDA GPU, but device='cpu': use rollout.engine=hf "
            "on CPU, or device=auto/cuda on a GPU machine"
        )
    if cfg.algo.advantage in ("group", "group_centered") and cfg.rollout.group_size < 2:
        problems.append(
            f"algo.advantage={cfg.algo.advantage!r} needs rollout.group_size >= 2: a group of one "
            "sample is its own mean, so every advantage r − mean is 0 and nothing would be "
            "learnt; sample several responses per prompt, or use an estimator with a baseline "
            "for one sample: algo.advantage=remax (greedy response) or sppo (learned critic)"
        )
    if cfg.algo.advantage == "rloo" and cfg.rollout.group_size < 2:
        problems.append(
            "algo.advantage='rloo' needs rollout.group_size >= 2 (the leave-one-out baseline "
            f"averages the other samples of the prompt), got {cfg.rollout.group_size}"
        )
    if cfg.rollout.old_logprobs_source == "sampler" and cfg.rollout.top_p < 1:
        problems.append(
            f"rollout.old_logprobs_source='sampler' cannot be combined with rollout.top_p="
            f"{cfg.rollout.top_p:g}: the sampler's log-probs are renormalised over the top-p "
            "nucleus while the update's π_θ is the full softmax, so at θ = θ_old every ratio "
            "π_θ/π_old is the nucleus mass, below 1 (GSPO's 3e-4 lower clip would stop every "
            "negative-advantage response from the first minibatch on); use "
            "rollout.old_logprobs_source=recompute (algo.mismatch can then correct for the "
            "nucleus), or rollout.top_p=1"
        )
    uses_mu = cfg.rollout.old_logprobs_source == "sampler" or (
        cfg.algo.mismatch.correction in ("truncate", "mask")
        or (cfg.algo.mismatch.correction == "auto" and cfg.rollout.max_staleness > 0)
    )
    if cfg.rollout.logprob_noise and not uses_mu:
        problems.append(
            f"rollout.logprob_noise={cfg.rollout.logprob_noise:g} perturbs the sampler's "
            "log-probs, which this run never uses (π_old is recomputed and algo.mismatch does "
            "not correct): set rollout.old_logprobs_source=sampler (the engine's log-probs as "
            "π_old, GSPO §5.4) or algo.mismatch.correction=truncate, or rollout.logprob_noise=0"
        )
    if cfg.rollout.max_staleness and cfg.rollout.engine == "vllm":
        problems.append(
            "rollout.max_staleness >= 1 runs the rollout worker with rollout.engine=hf or fast; "
            "the vLLM engine is colocated in the trainer's process and cannot sample ahead yet: "
            "set rollout.engine=hf, or rollout.max_staleness=0"
        )
    if cfg.rollout.max_staleness and cfg.dist.strategy == "fsdp":
        problems.append(
            "rollout.max_staleness >= 1 with dist.strategy=fsdp: the rollout worker needs the "
            "full weights of every version, which sharded training does not gather for it yet; "
            "use dist.strategy=replicate, or rollout.max_staleness=0"
        )
    # both force the routing of the updates' forwards, against the one recorded at θ_old
    moe = {"moe.routing_replay": cfg.moe.routing_replay, "moe.reroute_frac": cfg.moe.reroute_frac}
    forcing = " and ".join(key for key, on in moe.items() if on)
    if forcing and cfg.rollout.old_logprobs_source != "recompute":
        problems.append(
            f"{forcing}: the old policy's routing is recorded while the old log-probs are "
            "recomputed, so this needs rollout.old_logprobs_source='recompute'"
        )
    if forcing and cfg.model.gradient_checkpointing:
        problems.append(
            f"{forcing} cannot be combined with model.gradient_checkpointing (the recomputed "
            "forward would route by itself): turn one of them off"
        )
    if cfg.moe.reroute_frac and cfg.algo.num_minibatches * cfg.algo.ppo_epochs == 1:
        problems.append(
            "moe.reroute_frac re-routes the forwards after a rollout's first optimizer step, "
            "and this run takes one (algo.num_minibatches × algo.ppo_epochs = 1): raise "
            "algo.num_minibatches, or set moe.reroute_frac=0"
        )
    problems += _fsdp_problems(cfg)
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if batch % cfg.algo.num_minibatches:
        divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
        problems.append(
            f"rollout.prompts_per_step × rollout.group_size = {batch} sequences do not split into "
            f"algo.num_minibatches={cfg.algo.num_minibatches} equal minibatches "
            f"(divisors of {batch}: {', '.join(map(str, divisors))})"
        )
    return problems


def _loss_problems(cfg: RunConfig) -> list[str]:
    """Validate algo.loss against the core preset, with hints in config terms."""
    name, overrides = cfg.algo.name, cfg.loss_overrides()
    merged = dataclasses.replace(POLICY_LOSS_DEFAULTS[name], **overrides)
    if merged.agg == "seq-mean-token-sum-norm" and merged.max_tokens is None:
        budget = cfg.rollout.max_new_tokens
        if budget is not None:
            fix = f"set algo.loss.max_tokens={budget} (= rollout.max_new_tokens)"
        else:
            budget = _task_budget(cfg.task)
            value = budget if budget is not None else "<generation budget>"
            fix = f"set algo.loss.max_tokens={value} and rollout.max_new_tokens={value}"
        return [
            f"algo.loss.max_tokens is required: {name!r} aggregates with seq-mean-token-sum-norm, "
            "which divides by the training-wide generation budget (Dr. GRPO's MAX_TOKENS); " + fix
        ]
    if merged.agg != "seq-mean-token-sum-norm" and merged.max_tokens is not None:
        return [
            f"algo.loss.max_tokens={merged.max_tokens:g} only applies to "
            f"agg='seq-mean-token-sum-norm' (Dr. GRPO), not {merged.agg!r}; "
            "set algo.loss.max_tokens=null"
        ]
    problems = []
    for key, value, ok, rule in (
        (
            "max_tokens",
            merged.max_tokens,
            merged.max_tokens is None or merged.max_tokens > 0,
            "> 0",
        ),
        ("kl_coef", merged.kl_coef, merged.kl_coef >= 0, ">= 0"),
        (
            "log_ratio_clamp",
            merged.log_ratio_clamp,
            merged.log_ratio_clamp is None or merged.log_ratio_clamp > 0,
            "> 0 (or null)",
        ),
    ):
        if not ok:
            problems.append(f"algo.loss.{key} must be {rule}, got {value}")
    if not problems:
        try:
            resolve_policy_loss_config(name, **overrides)
        except (TypeError, ValueError) as err:
            problems.append(f"algo.loss (algo.name={name!r}): {err}")
    return problems


def _shaping_problems(cfg: RunConfig) -> list[str]:
    """The soft overlong window must fit in the generation budget."""
    buffer = cfg.reward.overlong_buffer
    if buffer is None:
        return []
    budget = cfg.rollout.max_new_tokens or _task_budget(cfg.task)
    if budget is not None and buffer > budget:
        return [
            f"reward.overlong_buffer={buffer} exceeds the generation budget {budget} "
            "(rollout.max_new_tokens, or the task's): the penalty window L_cache must lie inside "
            "it; lower reward.overlong_buffer or raise rollout.max_new_tokens"
        ]
    return []


def _critic_problems(cfg: RunConfig) -> list[str]:
    out, kind, name, adv = [], cfg.critic.kind, cfg.algo.name, cfg.algo.advantage
    if name in CRITIC_ALGOS and kind != CRITIC_ALGOS[name]:
        need = CRITIC_ALGOS[name]
        estimator = next(a for a, k in CRITIC_ADVANTAGES.items() if k == need)
        out.append(
            f"algo.name={name!r} learns its advantage from {_CRITIC_WHAT[need]}, but "
            f"critic.kind={kind!r}: set critic.kind={need} and algo.advantage={estimator} "
            f"(or start from `preset: {name}`)"
        )
    elif name in CRITIC_ALGOS and adv != next(a for a, k in CRITIC_ADVANTAGES.items() if k == kind):
        estimator = next(a for a, k in CRITIC_ADVANTAGES.items() if k == kind)
        out.append(f"algo.name={name!r} needs algo.advantage={estimator}, got {adv!r}")
    elif adv in CRITIC_ADVANTAGES and kind != CRITIC_ADVANTAGES[adv]:
        out.append(
            f"algo.advantage={adv!r} needs critic.kind={CRITIC_ADVANTAGES[adv]} "
            f"({_CRITIC_WHAT[CRITIC_ADVANTAGES[adv]]}), got critic.kind={kind!r}"
        )
    elif kind != "none" and adv not in CRITIC_ADVANTAGES:
        out.append(
            f"critic.kind={kind!r} but algo.advantage={adv!r} does not use a critic: set "
            "critic.kind=none, or algo.advantage=sppo (scalar) / gae (token)"
        )
    shaping = reward_shaping(cfg)
    if kind == "token" and cfg.critic.token_loss == "bce" and shaping:
        out.append(
            "critic.token_loss='bce' (the SPPO paper's PPO + BCE ablation) trains V(s_t) = σ(z_t) "
            "towards the 0/1 outcome, and GAE uses that V as the baseline of the reward, which "
            f"is then on another scale: {', '.join(shaping)}; remove the shaping, or use "
            "critic.token_loss=mse (a value function of the shaped return)"
        )
    if cfg.critic.lora and not cfg.model.lora.r:
        out.append("critic.lora=true uses model.lora's settings: set model.lora.r > 0 (e.g. 8)")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    minibatches = cfg.critic.num_minibatches
    if kind != "none" and minibatches is not None and batch % minibatches:
        out.append(
            f"{batch} sequences per step do not split into critic.num_minibatches={minibatches} "
            "equal minibatches"
        )
    return out


def reward_shaping(cfg: RunConfig) -> list[str]:
    """The settings that make the policy's reward differ from the verifier's 0/1 outcome."""
    rw, out = cfg.reward, []
    if rw.incorrect != 0:
        out.append(f"reward.incorrect={rw.incorrect:g}")
    if rw.overlong_buffer is not None:
        out.append(f"reward.overlong_buffer={rw.overlong_buffer}")
    if rw.terms:
        out.append(f"reward.terms ({', '.join(t.fn for t in rw.terms)})")
    if rw.kl_coef:
        out.append(f"reward.kl_coef={rw.kl_coef:g}")
    return out


def _fsdp_problems(cfg: RunConfig) -> list[str]:
    """What ``dist.strategy: fsdp`` cannot be combined with (yet)."""
    if cfg.dist.strategy != "fsdp":
        return []
    out = []
    if cfg.dist.fsdp.cpu_offload and cfg.device == "cpu":
        out.append(
            "dist.fsdp.cpu_offload moves the shards from the GPU to CPU memory, but device='cpu' "
            "(the shards are in CPU memory already): set dist.fsdp.cpu_offload=false"
        )
    if cfg.rollout.engine == "vllm" and cfg.model.lora.r:
        out.append(
            "rollout.engine=vllm with LoRA (model.lora.r > 0) is not supported under "
            "dist.strategy=fsdp yet (the merged weights would have to be gathered); use "
            "rollout.engine=hf, or dist.strategy=replicate"
        )
    return out


def _task_budget(task: TaskConfig) -> int | None:
    """The task's own generation budget, for a hint; None when the task cannot be built."""
    if task.name == "file":
        return None  # loading the files is the trainer's job, not validation's
    try:
        return int(task.build().max_new_tokens)
    except Exception:  # only a hint: any failure falls back to a placeholder
        return None


# --------------------------------------------------------------------------- warnings


def validate_warnings(cfg: RunConfig) -> list[str]:
    """Settings that run but are probably not what was meant (the CLI prints them)."""
    loss = cfg.resolved_loss()
    name = cfg.algo.name
    out = []
    sequence_ratio = loss.ratio_level != "token"
    if sequence_ratio and loss.agg != "seq-mean-token-mean":
        out.append(
            f"algo.loss.agg={loss.agg!r} with {name}'s sequence-level ratio: GSPO averages "
            "each sequence's token terms (seq-mean-token-mean, Eq. 5); token-summed or "
            "token-mean aggregation re-weights sequences by their length"
        )
    if sequence_ratio and max(loss.clip_low, loss.clip_high) >= 0.1:
        out.append(
            f"algo.loss.clip_low/clip_high = {loss.clip_low:g}/{loss.clip_high:g} with {name}'s "
            "sequence-level ratio: GSPO's ranges are ~3e-4/4e-4 (§5.1); the length-normalised "
            "sequence ratio stays so close to 1 that a token-scale range almost never clips"
        )
    on_policy = (
        cfg.algo.num_minibatches * cfg.algo.ppo_epochs == 1
        and cfg.rollout.old_logprobs_source == "recompute"
    )
    if on_policy and (sequence_ratio or loss.future_kl_weights):
        what = "FIPO's future-KL weights are all 1 and " if loss.future_kl_weights else ""
        out.append(
            f"{name} is fully on-policy (algo.num_minibatches × algo.ppo_epochs = 1 with "
            "rollout.old_logprobs_source='recompute'): the importance ratio is exactly 1, so "
            f"{what}clipping never acts; use algo.num_minibatches > 1 (GSPO uses 4)"
        )
    if cfg.reward.kl_coef and loss.kl_coef:
        out.append(
            f"reward.kl_coef={cfg.reward.kl_coef:g} and algo.loss.kl_coef="
            f"{loss.kl_coef:g}: the KL to the reference is penalised twice, in the reward and in "
            "the loss; the papers use one placement (RLOO, ReMax, PPO: the reward; GRPO: the "
            "loss), so set one of them to 0"
        )
    out += _inert_safety_ablation(cfg, loss)
    if cfg.moe.routing_replay and cfg.algo.num_minibatches * cfg.algo.ppo_epochs == 1:
        out.append(
            "moe.routing_replay with one update per rollout (algo.num_minibatches × "
            "algo.ppo_epochs = 1): θ = θ_old in the only forward, so there is nothing to replay"
        )
    budget = cfg.rollout.max_new_tokens
    if loss.max_tokens is not None and budget is not None and loss.max_tokens != budget:
        out.append(
            f"algo.loss.max_tokens={loss.max_tokens:g} differs from rollout.max_new_tokens="
            f"{budget}: Dr. GRPO's MAX_TOKENS is the generation budget; change them together"
        )
    if cfg.algo.advantage == "sppo" and cfg.rollout.group_size > 1:  # critic warning
        out.append(
            f"SPPO with rollout.group_size={cfg.rollout.group_size}: the paper samples one "
            "response per prompt (N = 1), the critic V(prompt) being the baseline; extra samples "
            "cost rollout time without changing the estimator"
        )
    shaping = reward_shaping(cfg)
    if cfg.algo.advantage == "sppo" and shaping:
        out.append(
            f"SPPO with a shaped reward ({', '.join(shaping)}): the critic still learns "
            "P(correct) from the verifier's 0/1 outcome, and the advantage is "
            "A = R − (r_w + (1 − r_w)·V) with r_w = reward.incorrect, so the outcome part is "
            "baselined and any overlong penalty or extra term enters A as it is; the paper's "
            "reward is the 0/1 outcome (reward.incorrect=0, no shaping)"
        )
    stale = cfg.rollout.max_staleness
    if stale and cfg.rollout.old_logprobs_source == "sampler":
        out.append(
            f"rollout.max_staleness={stale} with rollout.old_logprobs_source='sampler': π_old is "
            "then the rollout worker's μ, up to that many steps old, so the clip is centred on the "
            "stale policy and algo.mismatch cannot correct anything; keep "
            "old_logprobs_source=recompute (π_old = the trainer's policy when the step begins)"
        )
    elif cfg.algo.mismatch.correction not in ("none", "auto") and (
        cfg.rollout.old_logprobs_source == "sampler"
    ):
        out.append(
            f"algo.mismatch.correction={cfg.algo.mismatch.correction!r} with "
            "rollout.old_logprobs_source='sampler': π_old is then the sampler's μ, the mismatch "
            "ratio π_old/μ is exactly 1 and the correction does nothing; use "
            "old_logprobs_source=recompute, or algo.mismatch.correction=none"
        )
    if cfg.rollout.dynamic_sampling and cfg.rollout.group_size == 1:
        out.append(
            "rollout.dynamic_sampling with rollout.group_size=1 keeps every group (a single "
            "answer has no spread to filter on); use group_size >= 2 or dynamic_sampling=false"
        )
    fsdp = cfg.dist.fsdp
    changed = [k for k, f in type(fsdp).model_fields.items() if getattr(fsdp, k) != f.default]
    if cfg.dist.strategy != "fsdp" and changed:
        keys = ", ".join(f"dist.fsdp.{k}" for k in changed)
        out.append(
            f"{keys} {'apply' if len(changed) > 1 else 'applies'} only to dist.strategy=fsdp, "
            "and the strategy is replicate: set dist.strategy=fsdp to shard the model"
        )
    mp = cfg.dist.fsdp.param_dtype
    if cfg.dist.strategy == "fsdp" and mp == "bfloat16" and cfg.model.dtype == "bfloat16":
        out.append(
            "dist.fsdp.param_dtype=bfloat16 with model.dtype=bfloat16 keeps no float32 master "
            "weights (the sharded weights and AdamW state are bfloat16 too); mixed precision "
            "means model.dtype=float32 with dist.fsdp.param_dtype=bfloat16"
        )
    if ":" in cfg.task.reward and any(t.fn == "format" for t in cfg.reward.terms):
        out.append(
            f"reward.terms has 'format' but the verifier is your function {cfg.task.reward!r}, "
            "which parses no answer: the format term is always 0"
        )
    return out


def _inert_safety_ablation(cfg: RunConfig, loss) -> list[str]:
    """FIPO's safety rule at a threshold ≥ the dual-clip c touches only dual-clipped tokens (zero
    gradient): an explicit change between such thresholds (or to off) changes no update."""
    c = loss.dual_clip_c
    if not loss.future_kl_weights or c is None:
        return []
    if "safety_threshold" not in cfg.algo.loss.overrides():
        return []
    rest = {k: v for k, v in cfg.loss_overrides().items() if k != "safety_threshold"}
    if "safety_threshold" in (FIPO_PRESETS.get(cfg.algo.fipo_preset) or {}):
        rest["safety_threshold"] = FIPO_PRESETS[cfg.algo.fipo_preset]["safety_threshold"]
    before = resolve_policy_loss_config(cfg.algo.name, **rest).safety_threshold

    def inert(threshold: float | None) -> bool:
        return threshold is None or threshold >= c

    if not (inert(before) and inert(loss.safety_threshold)):
        return []
    return [
        f"algo.loss.safety_threshold={loss.safety_threshold} (default here {before}) with "
        f"dual_clip_c={c:g}: FIPO's safety rule only changes tokens with Â < 0 and a ratio above "
        "the threshold, and at a threshold ≥ c those tokens are dual-clipped (zero gradient), so "
        "this changes the loss value and fipo/* metrics but no update; to ablate the rule, "
        "compare against a threshold below c (the 7B setting is 3)"
    ]
