"""Run configuration: pydantic models, packaged YAML presets, ``key=value`` overrides.

    cfg = load_config("my_run.yaml", ["algo.loss.clip_high=5e-4", "train.steps=10"])
    cfg.resolved_loss()        # the seqrl.core.PolicyLossConfig the trainer runs
    validate_warnings(cfg)     # settings that run but are probably not what you meant
    cfg.to_yaml()              # the fully resolved, self-contained config

Layering, lowest first: schema defaults < packaged presets (``preset: NAME``, recursively) <
the YAML file < overrides. Mappings are deep-merged (the later layer wins key by key); any other
value, lists included, is replaced. An override replaces whatever was at its key, so
``algo.loss={}`` clears a preset's loss settings. ``algo.loss`` holds only overrides of the
``seqrl.core`` loss preset named by ``algo.name``: leaving a field out keeps the paper default.

Every problem is reported as one :class:`ConfigError` naming the dotted key, the closest valid
key for a misspelling, and the file, preset or override that set it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import time
import typing
from collections.abc import Iterable, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from seqrl.core.fipo import FIPO_PRESETS
from seqrl.core.losses import (
    FOREIGN_NAMES,
    POLICY_LOSS_DEFAULTS,
    POLICY_LOSS_NAMES,
    PolicyLossConfig,
    _closest,
    resolve_policy_loss_config,
)

DEFAULT_PRESET = "default"

# name → (one-line description, paper). The YAML files under seqrl/presets hold only config.
PRESET_INFO: dict[str, tuple[str, str]] = {
    "default": (
        "the embedded demo: GSPO on the built-in tiny model and 3-digit addition",
        "arXiv 2507.18071",
    ),
    "grpo": (
        "group-normalised advantages, per-sequence mean, k3 KL (β = 0.04) to a frozen reference",
        "arXiv 2402.03300",
    ),
    "dapo": (
        "as the paper: clip-higher [0.2, 0.28], token-mean, dynamic sampling, soft overlong "
        "punishment, ±1 reward, no dual clip",
        "arXiv 2503.14476",
    ),
    "dapo_verl": (
        "DAPO as verl's recipe runs it (FIPO's baseline): `dapo` + dual clip 10, warm-up 10, "
        "weight decay 0.1",
        "arXiv 2503.14476, 2603.19835",
    ),
    "fipo": (
        "FIPO, official 32B settings: future-KL weights [1.0, 1.2], τ 32, safety 10, drop rule, "
        "8 minibatches, on dapo_verl",
        "arXiv 2603.19835",
    ),
    "fipo_7b": ("FIPO's 7B pilot: weights [0.8, 1.2], safety 3.0", "arXiv 2603.19835"),
    "fipo_swift": (
        "FIPO with ms-swift's defaults: no ratio filter, dual clip or drop rule; safety 4.0",
        "arXiv 2603.19835",
    ),
    "dr_grpo": (
        "group-centred advantages, token sum / MAX_TOKENS (the generation budget)",
        "arXiv 2503.20783",
    ),
    "gspo": (
        "sequence-level ratio and clipping [3e-4, 4e-4], 4 minibatches per rollout",
        "arXiv 2507.18071",
    ),
    "gspo_moe": (
        "GSPO on the tiny MoE warm start, no Routing Replay; logs routing churn",
        "arXiv 2507.18071",
    ),
    "grpo_moe_replay": (
        "GRPO on the tiny MoE warm start with Routing Replay (R2); logs routing churn",
        "arXiv 2507.18071",
    ),
    "gspo_token": (
        "GSPO-token: sg[s_i]·π/sg[π] token ratios, same clipping as GSPO",
        "arXiv 2507.18071",
    ),
    "rloo": ("leave-one-out baseline over the group, verl's clipped loss", "arXiv 2402.14740"),
    "remax": (
        "one sample per prompt, greedy-decoding baseline, verl's clipped loss",
        "arXiv 2310.10505",
    ),
    "sppo": (
        "one sample per prompt, A = R − V(prompt) from a scalar BCE critic (policy-sized), "
        "clip 0.2, dual clip 3",
        "arXiv 2604.08865",
    ),
    "sppo_small_critic": (
        "SPPO with a decoupled critic smaller than the policy (built-in nano, random init)",
        "arXiv 2604.08865",
    ),
    "ppo": (
        "token critic, GAE γ = λ = 1, whitened, clipped value loss, critic warm-up (SPPO's baseline)",
        "arXiv 1707.06347",
    ),
}

# Names other frameworks (TRL, verl, OpenRLHF) use for our keys, for unknown-key hints.
CONFIG_ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "max_grad_norm": "optim.grad_clip",
    "clip_grad": "optim.grad_clip",
    "lr_scheduler_type": "optim.schedule",
    "num_generations": "rollout.group_size",
    "n_samples_per_prompt": "rollout.group_size",
    "max_completion_length": "rollout.max_new_tokens",
    "response_length": "rollout.max_new_tokens",
    "max_steps": "train.steps",
    "total_steps": "train.steps",
    "ppo_mini_batch_size": "algo.num_minibatches",
    "num_iterations": "algo.ppo_epochs",
    "model_name_or_path": "model.policy",
    # seqrl.core's hints for loss hyperparameters, as dotted config keys
    **{
        foreign: "algo.name"
        if ours == "the policy_loss name"
        else " and ".join(f"algo.loss.{part}" for part in ours.split(" and "))
        for foreign, ours in FOREIGN_NAMES.items()
    },
}


class ConfigError(ValueError):
    """An invalid run configuration; ``problems`` lists each problem, one line each."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"invalid config: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid config ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


# --------------------------------------------------------------------------- models


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, coerce_numbers_to_str=True
    )


class LoraConfig(_Section):
    """LoRA adapters via peft (``pip install 'seqrl[peft]'``); ``r: 0`` trains every weight."""

    r: int = Field(0, ge=0)  # adapter rank; 0 = off (full fine-tuning)
    alpha: float = Field(16.0, gt=0)  # scale alpha / r
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"


class ModelConfig(_Section):
    # builtin:NAME or a local HF dir; the default is the demo's warm start
    policy: str = Field("builtin:tiny-addition-noisy", min_length=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    reference: str | None = None  # None = frozen copy of the initial policy (built if kl_coef > 0)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    lora: LoraConfig = Field(default_factory=LoraConfig)


class ColumnsConfig(_Section):
    """Which field of a data file holds what (``task.columns.prompt=question``); None = same name."""

    prompt: str | None = None
    answer: str | None = None
    tests: str | None = None


class TaskConfig(_Section):
    name: Literal["addition", "scratchpad", "file"] = "addition"
    digits: int = Field(3, ge=1)  # addition: operand digits; scratchpad: digits per operand
    operands: int = Field(4, ge=2)  # scratchpad only; addition ignores it
    seed: int = 1234
    train_size: int = Field(20000, ge=1)  # at most; a file task uses all its rows if fewer
    eval_size: int = Field(200, ge=1)
    # name=file: problems from data files (seqrl.tasks.files), scored by a named verifier
    train_file: str | None = None  # .jsonl / .csv / .parquet / saved datasets dir
    test_file: str | None = None  # the held-out problems for evaluation
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    reward: Literal["math", "code", "exact"] = "math"
    answer_mode: Literal["auto", "boxed", "gsm8k", "last_number", "final_line"] = "auto"
    prompt_template: str = "{prompt}"
    chat_template: bool = False  # wrap each prompt as a user turn in the tokenizer's chat template
    on_error: Literal["raise", "skip"] = "raise"  # a malformed row: stop, or skip and count

    def build(self):
        """The task this section describes (built-in, or :class:`seqrl.tasks.filetask.FileTask`)."""
        from seqrl.tasks import get_task

        if self.name == "file":
            from seqrl.tasks.filetask import FileTask

            return FileTask(
                self.train_file,
                self.test_file,
                columns={k: v for k, v in self.columns.model_dump().items() if v},
                reward=self.reward,
                answer_mode=self.answer_mode,
                prompt_template=self.prompt_template,
                on_error=self.on_error,
            )
        kwargs = {"digits": self.digits, "seed": self.seed}
        if self.name == "scratchpad":
            kwargs["operands"] = self.operands
        return get_task(self.name, **kwargs)


class VLLMConfig(_Section):
    """The colocated vLLM engine (``rollout.engine: vllm``; GPU only, ``pip install seqrl[vllm]``)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)  # share of GPU memory vLLM may take
    max_model_len: int | None = Field(None, ge=1)  # None = vLLM's default for the model
    enforce_eager: bool = False  # no CUDA graphs: slower decoding, faster start, less memory
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = model.dtype


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=1)  # samples per prompt, G
    max_new_tokens: int | None = Field(None, ge=1)  # None = the task's budget
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    old_logprobs_source: Literal["recompute", "sampler"] = "recompute"
    # hf = transformers generate (any device); fast = seqrl.rollout.fast.FastSampler (one prefill
    # per prompt, lean decode loop, same sampling distribution; falls back to generate where it
    # cannot match it); vllm = colocated vLLM engine, weights pushed after every optimiser step
    # (CUDA only)
    engine: Literal["hf", "fast", "vllm"] = "hf"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    # DAPO dynamic sampling (Eq. 11): keep only groups whose answers are neither all right nor all
    # wrong, generating further batches of prompts until prompts_per_step groups are kept or
    # max_gen_batches batches were generated (then the step trains on the groups it has).
    dynamic_sampling: bool = False
    gen_batch_prompts: int | None = Field(None, ge=1)  # prompts per generation batch; None = P
    max_gen_batches: int = Field(10, ge=1)


class _LossOverridesBase(_Section):
    """Explicitly set fields of :class:`seqrl.core.PolicyLossConfig`; unset fields read None."""

    def overrides(self) -> dict[str, Any]:
        """The explicitly set fields, in dataclass order (``resolve_policy_loss_config`` kwargs)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}

    # A read-only mapping of the overrides: dict(loss), **loss and `k in loss` see only set fields.
    def keys(self):
        return self.overrides().keys()

    def __getitem__(self, key: str) -> Any:
        return self.overrides()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.model_fields_set

    def __iter__(self):
        yield from self.overrides().items()

    @model_serializer(mode="wrap")
    def _serialize_set_fields(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}

    def __repr_args__(self):
        return self.overrides().items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _LossOverridesBase):
            return NotImplemented
        return self.overrides() == other.overrides()

    def __hash__(self) -> int:
        return hash(tuple(self.overrides().items()))


def _loss_overrides_model() -> type[_LossOverridesBase]:
    """A model with one optional field per PolicyLossConfig field, typed as the dataclass."""
    hints = typing.get_type_hints(PolicyLossConfig)
    fields = {f.name: (hints[f.name], None) for f in dataclasses.fields(PolicyLossConfig)}
    return create_model("LossOverrides", __base__=_LossOverridesBase, __module__=__name__, **fields)


LossOverrides = _loss_overrides_model()


class RewardTermConfig(_Section):
    """One extra reward term: ``weight · fn(completion, example)`` (see seqrl.tasks.rewards)."""

    fn: str = Field(min_length=1)  # "format" or "package.module:function"
    weight: float = 1.0


class RewardConfig(_Section):
    """Reward values, extra terms and DAPO's overlong shaping (arXiv 2503.14476, §3.4, Eq. 13)."""

    incorrect: float = 0.0  # reward of a wrong answer (a right one gets 1); DAPO/FIPO use -1
    overlong_buffer: int | None = Field(None, ge=1)  # soft punishment window L_cache; None = off
    overlong_penalty_factor: float = Field(1.0, ge=0)  # verl's overlong_buffer.penalty_factor
    overlong_filter: bool = False  # mask truncated responses out of the loss
    # extra terms added to the verifier's reward, e.g. [{fn: format, weight: 0.1}]
    terms: tuple[RewardTermConfig, ...] = ()


class MismatchConfig(_Section):
    """Train–inference mismatch correction (seqrl.core.mismatch): weights on π_old/μ per token.

    correction: none | truncate (w = min(ρ, C), TIS) | mask (w = ρ·1[ρ ≤ C]); level: ρ per
    token or per sequence (the product over the response); cap: C.
    """

    correction: Literal["none", "truncate", "mask"] = "none"
    level: Literal["token", "sequence"] = "token"
    cap: float = Field(2.0, gt=0)


class AlgoConfig(_Section):
    name: str = "gspo"  # one of seqrl.core.POLICY_LOSS_NAMES
    # sppo = R − V(prompt) from critic.kind=scalar; gae = GAE from critic.kind=token
    advantage: Literal["group", "group_centered", "rloo", "remax", "sppo", "gae"] = "group"
    adv_eps: float = Field(1e-6, ge=0)
    num_minibatches: int = Field(4, ge=1)  # optimiser steps per rollout batch (per epoch)
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(64, ge=1)  # sequences per forward/backward
    # run each group's shared prompt once per micro-batch and the G responses on its KV cache
    # (same log-probs up to float rounding; seqrl.train.step.shared_prefix_logits)
    shared_prefix: bool = False
    loss: LossOverrides = Field(default_factory=LossOverrides)
    mismatch: MismatchConfig = Field(default_factory=MismatchConfig)
    # FIPO only: start algo.loss from seqrl.core.FIPO_PRESETS[fipo_preset]; algo.loss still wins.
    fipo_preset: Literal["official_32b", "7b", "ms_swift"] | None = None

    @field_validator("name")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        if name not in POLICY_LOSS_DEFAULTS:
            raise ValueError(
                f"unknown algorithm {name!r}{_closest(name, POLICY_LOSS_NAMES)} "
                f"(choose one of {', '.join(POLICY_LOSS_NAMES)})"
            )
        return name


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)  # AdamW
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)  # global grad-norm clip; None = off
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor, as a fraction of lr

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, betas: Any) -> Any:
        if isinstance(betas, (list, tuple)) and len(betas) != 2:
            raise ValueError(f"needs exactly two values [beta1, beta2], got {list(betas)}")
        return betas

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"both betas must lie in [0, 1), got {list(betas)}")
        return betas


class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    eval_every: int = Field(25, ge=0)  # 0 = only at start and end
    eval_samples: int = Field(4, ge=0)  # k for eval/sampled_acc (avg@k); 0 = greedy only
    eval_temperature: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=0)  # 0 = only the final checkpoint
    keep_checkpoints: int = Field(2, ge=1)
    log_samples: int = Field(4, ge=0)  # decoded rollouts per step in samples.jsonl
    max_nonfinite_steps: int = Field(3, ge=0)


# ---- critic (SPPO scalar prompt critic, PPO-GAE token critic) --------------------------------


class CriticConfig(_Section):
    """The value model of SPPO (``kind: scalar``) and PPO-GAE (``kind: token``); its own AdamW."""

    kind: Literal["none", "scalar", "token"] = "none"
    lora: bool = False  # LoRA adapters (model.lora's settings) + a fully trained value head
    model: str = Field("policy", min_length=1)  # "policy" (its weights), builtin:SIZE, local dir
    lr: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)  # linear LR warm-up of the critic's optimizer
    warmup_steps: int = Field(0, ge=0)  # first RL steps train only the critic (verl critic_warmup)
    num_minibatches: int | None = Field(None, ge=1)  # None = algo.num_minibatches
    ppo_epochs: int = Field(1, ge=1)
    # token critic loss: mse = PPO's clipped squared error; bce = σ(z_t) trained with BCE towards
    # the returns, the SPPO paper's "PPO + BCE" ablation (§4.3). The scalar critic always uses BCE.
    token_loss: Literal["mse", "bce"] = "mse"
    value_clip: float | None = Field(
        0.5, gt=0
    )  # token critic ε_v (mse); None = plain squared error
    gamma: float = Field(1.0, ge=0, le=1)  # token critic GAE γ
    lam: float = Field(1.0, ge=0, le=1)  # token critic GAE λ
    whiten: bool = True  # token critic: whiten GAE advantages over the batch's valid tokens


# ---- end critic ------------------------------------------------------------------------------


class MoEConfig(_Section):
    """Mixture-of-experts policies (any supported HF MoE, e.g. builtin:tiny-moe).

    The routing of every rollout is recorded when the old log-probs are recomputed, and the
    ``moe/*`` metrics (routing churn, expert load) are logged; ignored for a dense policy.
    """

    # Routing Replay (GSPO §5.3, R2): route every training forward of a rollout through the
    # experts π_old chose for its tokens, with the current router's weights at those experts
    routing_replay: bool = False


class LogConfig(_Section):
    tensorboard: Literal["auto", True, False] = "auto"  # auto = if installed


class RunConfig(_Section):
    """One training run. Build it with :func:`load_config`; ``preset`` is consumed there."""

    name: str | None = None  # run name; None = "<algo.name>-<YYYYmmdd-HHMMSS>" (run_name)
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolved_loss(self) -> PolicyLossConfig:
        """The core loss preset ``algo.name`` with :meth:`loss_overrides` applied."""
        return resolve_policy_loss_config(self.algo.name, **self.loss_overrides())

    def loss_overrides(self) -> dict[str, Any]:
        """``policy_loss`` keyword arguments: FIPO_PRESETS[algo.fipo_preset], then algo.loss."""
        base = FIPO_PRESETS[self.algo.fipo_preset] if self.algo.fipo_preset else {}
        return {**base, **self.algo.loss.overrides()}

    @cached_property
    def run_name(self) -> str:
        """``name``, or ``<algo.name>-<YYYYmmdd-HHMMSS>`` fixed at first access."""
        return self.name or f"{self.algo.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def to_yaml(self) -> str:
        """The fully resolved config as YAML; ``load_config`` on it gives an equal config."""
        header = "# seqrl run config, fully resolved (presets and overrides applied)\n"
        return header + yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)

    def with_overrides(self, overrides: Iterable[str]) -> RunConfig:
        """A validated copy with ``key=value`` overrides applied (e.g. ``name=<run_name>``)."""
        return config_from_dict(self.model_dump(mode="json"), overrides, source="the config")


# ---- critic checks -----------------------------------------------------------------------
# Policy-loss name / advantage estimator → the critic kind it learns its advantage from.
CRITIC_ALGOS = {"sppo": "scalar", "ppo": "token"}
CRITIC_ADVANTAGES = {"sppo": "scalar", "gae": "token"}
_CRITIC_WHAT = {
    "scalar": "a scalar prompt critic, A = R − V(prompt)",
    "token": "GAE over a token critic",
}


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


# ---- end critic checks -------------------------------------------------------------------


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    """Checks that span sections; each message names its dotted keys."""
    if cfg.algo.fipo_preset is not None and cfg.algo.name != "fipo":
        return [
            f"algo.fipo_preset={cfg.algo.fipo_preset!r} only applies to algo.name='fipo', "
            f"not {cfg.algo.name!r}; set algo.fipo_preset=null"
        ]
    problems = _loss_problems(cfg) + _shaping_problems(cfg) + _critic_problems(cfg)
    if cfg.task.name == "file" and not (cfg.task.train_file and cfg.task.test_file):
        problems.append(
            "task.name='file' needs task.train_file and task.test_file (the held-out problems "
            "for evaluation; they may be the same file if you have no separate split)"
        )
    if cfg.rollout.engine == "vllm" and cfg.device == "cpu":
        problems.append(
            "rollout.engine='vllm' needs a CUDA GPU, but device='cpu': use rollout.engine=hf "
            "on CPU, or device=auto/cuda on a GPU machine"
        )
    if cfg.algo.advantage == "rloo" and cfg.rollout.group_size < 2:
        problems.append(
            "algo.advantage='rloo' needs rollout.group_size >= 2 (the leave-one-out baseline "
            f"averages the other samples of the prompt), got {cfg.rollout.group_size}"
        )
    if cfg.moe.routing_replay and cfg.rollout.old_logprobs_source != "recompute":
        problems.append(
            "moe.routing_replay records the old policy's routing while it recomputes the old "
            "log-probs, so it needs rollout.old_logprobs_source='recompute'"
        )
    if cfg.moe.routing_replay and cfg.model.gradient_checkpointing:
        problems.append(
            "moe.routing_replay cannot be combined with model.gradient_checkpointing (the "
            "recomputed forward would route by itself): turn one of them off"
        )
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if batch % cfg.algo.num_minibatches:
        divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
        problems.append(
            f"rollout.prompts_per_step × rollout.group_size = {batch} sequences do not split into "
            f"algo.num_minibatches={cfg.algo.num_minibatches} equal minibatches "
            f"(divisors of {batch}: {', '.join(map(str, divisors))})"
        )
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
    if cfg.algo.mismatch.correction != "none" and cfg.rollout.old_logprobs_source == "sampler":
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
    if cfg.algo.advantage in ("group", "group_centered") and cfg.rollout.group_size == 1:
        out.append(
            f"algo.advantage={cfg.algo.advantage!r} with rollout.group_size=1: every advantage "
            "is 0 and nothing is learnt; use group_size >= 2 or algo.advantage='remax'"
        )
    return out


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats (1e-4, 3e4) and an error on duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """safe_dump with lists inline ([0.9, 0.999]) and mappings as blocks."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{context}; {problem}" if context and problem != context else problem
        raise ConfigError(f"{source}: invalid YAML{where}: {detail}") from None


def _read_mapping(text: str, source: str) -> dict:
    data = _parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------- presets


def _presets_dir():
    return resources.files("seqrl") / "presets"


def _preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml")
    )


def list_presets() -> list[tuple[str, str, str]]:
    """(name, description, paper) of every packaged preset, default first."""
    return [(name, *PRESET_INFO.get(name, ("", ""))) for name in _ordered_presets()]


def _ordered_presets() -> list[str]:
    names = _preset_names()
    return [n for n in PRESET_INFO if n in names] + [n for n in names if n not in PRESET_INFO]


def _read_preset(name: Any, needed_by: str) -> dict:
    names = _preset_names()
    if not isinstance(name, str) or name not in names:
        hint = _closest(name, names) if isinstance(name, str) else ""
        raise ConfigError(
            f"unknown preset {name!r} (in {needed_by}){hint} (presets: {', '.join(names)})"
        )
    text = (_presets_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    return _read_mapping(text, f"preset {name!r}")


def _expand_presets(doc: dict, source: str, chain: tuple[str, ...], sources: dict) -> dict:
    """``doc`` merged over its preset chain; records the source of every leaf in ``sources``."""
    doc = dict(doc)
    preset = doc.pop("preset", None)
    base: dict = {}
    if preset is not None:
        if preset in chain:
            cycle = " → ".join(f"{p!r}" for p in (*chain, preset))
            raise ConfigError(f"preset cycle: {cycle}")
        base = _read_preset(preset, source)
        base = _expand_presets(base, f"preset {preset!r}", (*chain, preset), sources)
    _record_sources(doc, (), source, sources)
    return _deep_merge(base, doc)


def _deep_merge(base: dict, child: Mapping) -> dict:
    """``base`` updated by ``child``: mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _record_sources(data: Any, path: tuple, source: str, sources: dict) -> None:
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            _record_sources(value, (*path, str(key)), source, sources)
    elif path:
        sources[path] = source


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=value"`` → (("a", "b", "c"), value parsed as YAML: 1e-4, null, [1, 2], ...)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(
            f"override {text!r} is not of the form key=value (e.g. 'train.steps=10', "
            "'algo.loss.clip_high=4e-4', 'model.reference=null')"
        )
    key, raw = (part.strip() for part in text.split("=", 1))
    path = tuple(key.split("."))
    if not key or not all(path):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key such as 'train.steps'")
    if not raw:
        raise ConfigError(f"override {text!r} has no value; write '{key}=null' for null")
    return path, _parse_yaml(raw, f"override {text!r}")


def _apply_override(data: dict, path: tuple[str, ...], value: Any, text: str) -> None:
    node = data
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(
                f"override {text!r}: {where!r} is {_kind(child)} ({child!r}), not a section"
            )
        node = child
    node[path[-1]] = value


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a run config: the default preset (``path=None``), a YAML file, or a preset name.

    ``overrides`` are ``"dotted.key=value"`` strings applied last (``"preset=NAME"`` swaps the
    base preset). Raises :class:`ConfigError` for every kind of problem.
    """
    if path is None:
        doc, source = {"preset": DEFAULT_PRESET}, "the default config"
    else:
        file = Path(path)
        if not file.exists() and str(path) in _preset_names():
            doc, source = {"preset": str(path)}, f"preset {str(path)!r}"
        else:
            doc, source = _read_mapping(_read_text(file), str(file)), str(file)
    return config_from_dict(doc, overrides, source=source)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if file.suffix not in (".yaml", ".yml") and len(file.parts) == 1:
            hint = f"{_closest(file.name, _preset_names())} (presets: {', '.join(_preset_names())})"
        raise ConfigError(f"config file not found: {file}{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {file}: {err}") from None


def config_from_dict(
    data: Mapping, overrides: Iterable[str] = (), *, source: str = "the config dict"
) -> RunConfig:
    """Validate a config mapping (which may name a ``preset``) with overrides applied last."""
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = [(*parse_override(text), text) for text in overrides]
    doc = dict(data)
    for key, value, text in parsed:
        if key == ("preset",):
            _read_preset(value, f"override {text!r}")  # fail early, naming the override
            doc["preset"] = value
    sources: dict[tuple, str] = {}
    merged = _expand_presets(doc, source, (), sources)
    for key, value, text in parsed:
        if key != ("preset",):
            _apply_override(merged, key, value, text)
            _forget_sources(sources, key)
            sources[key] = f"override {text!r}"
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError([_describe(e, sources) for e in err.errors()]) from None


def _forget_sources(sources: dict, prefix: tuple) -> None:
    for path in [p for p in sources if p[: len(prefix)] == prefix]:
        del sources[path]


# --------------------------------------------------------------------------- error messages


def _describe(error: dict, sources: dict) -> str:
    """One pydantic error as a line naming the dotted key (and where it was set)."""
    loc = tuple(error["loc"])
    dotted = _dotted(loc)
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        message = f"unknown key {dotted!r}{_key_hint(loc)}"
    elif kind == "value_error" and not loc:
        return "\n".join(_strip(error["msg"]).splitlines())
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = (
            f"{dotted}: expected a section (a mapping of keys), got {_kind(value)} {_short(value)}"
        )
    elif kind == "literal_error":
        options = re.findall(r"'([^']*)'|\b(True|False)\b", error["ctx"]["expected"])
        options = [a or b for a, b in options]
        hint = _closest(value, options) if isinstance(value, str) else ""
        message = f"{dotted}: must be one of {', '.join(options)}; got {_short(value)}{hint}"
    elif kind == "value_error":
        message = f"{dotted}: {_strip(error['msg'])}"
    else:
        message = f"{dotted}: {_strip(error['msg'])}; got {_short(value)}"
    origin = _source_of(loc, sources)
    return f"{message} ({origin})" if origin else message


def _strip(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_of(loc: tuple, sources: dict) -> str | None:
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in sources:
            return sources[loc[:cut]]
    below = [s for p, s in sources.items() if p[: len(loc)] == loc] if loc else []
    return below[-1] if below else None


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: Any = RunConfig
    for key in path:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def _all_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for key, field in model.model_fields.items():
        out.append(prefix + key)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _all_keys(sub, f"{prefix}{key}.")
    return out


def _key_hint(loc: tuple) -> str:
    """'; did you mean ...?' for an unknown key, searched at its level, then anywhere."""
    parent, key = loc[:-1], str(loc[-1])
    model = _model_at(parent)
    options = list(model.model_fields) if model else []
    if not parent:
        options.append("preset")
    prefix = "".join(f"{p}." for p in parent)
    lower = {o.lower(): o for o in options}
    if key.lower() in lower:
        return f"; did you mean {prefix + lower[key.lower()]!r}?"
    if key in CONFIG_ALIASES:
        return f"; seqrl calls it {CONFIG_ALIASES[key]!r}"
    match = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
    if match:
        return f"; did you mean {prefix + lower[match[0]]!r}?"
    elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1].lower() == key.lower()]
    if elsewhere:
        return f"; did you mean {' or '.join(repr(k) for k in elsewhere)}?"
    if options:
        return (
            f" (valid keys{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(options)})"
        )
    return ""


__all__ = [
    "CONFIG_ALIASES",
    "DEFAULT_PRESET",
    "PRESET_INFO",
    "AlgoConfig",
    "ConfigError",
    "CriticConfig",
    "LogConfig",
    "LossOverrides",
    "MismatchConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "VLLMConfig",
    "config_from_dict",
    "list_presets",
    "load_config",
    "parse_override",
    "validate_warnings",
]
