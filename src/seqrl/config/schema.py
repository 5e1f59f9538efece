"""The run config schema: one frozen pydantic model per section, and :class:`RunConfig`.

    cfg.resolved_loss()        # the seqrl.core.PolicyLossConfig the trainer runs
    cfg.to_yaml()              # the fully resolved, self-contained config
    cfg.with_overrides(["train.steps=10"])

Every section forbids unknown keys. ``algo.loss`` holds only overrides of the ``seqrl.core`` loss
preset named by ``algo.name``: leaving a field out keeps the paper default. A RunConfig checks
its cross-section rules (:mod:`seqrl.config.checks`) whenever it is validated.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import typing
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any, Literal

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

from seqrl.config.checks import cross_field_problems
from seqrl.config.layers import LAYER_KEYS, dump_yaml, resolve_layers
from seqrl.config.messages import ConfigError, describe
from seqrl.core.fipo import FIPO_PRESETS
from seqrl.core.losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    _closest,
    behaviour_level,
    resolve_policy_loss_config,
)
from seqrl.tasks.rewards import MAX_ABS_REWARD


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
    messages: str | None = None  # a chat: [{role, content}, ...] instead of a prompt
    completion: str | None = None  # the demonstration for seqrl sft (default: the answer)


BUILTIN_VERIFIERS = ("math", "code", "exact")


def _check_reward_name(value: str) -> str:
    """A built-in verifier, or a function as 'module:function' (or a registered callable)."""
    module, sep, attr = value.partition(":")
    if value in BUILTIN_VERIFIERS or (sep and module and attr):
        return value
    raise ValueError(
        f"must be one of {', '.join(BUILTIN_VERIFIERS)} or your own function as "
        f"'module:function' (e.g. 'my_rewards:score'); got {value!r}{_closest(value, BUILTIN_VERIFIERS)}"
    )


class TaskConfig(_Section):
    name: Literal["addition", "scratchpad", "file"] = "addition"
    digits: int = Field(3, ge=1)  # addition: operand digits; scratchpad: digits per operand
    operands: int = Field(4, ge=2)  # scratchpad only; addition ignores it
    seed: int = 1234
    train_size: int = Field(20000, ge=1)  # at most; a file task uses all its rows if fewer
    eval_size: int = Field(200, ge=1)
    # name=file: problems from data files (seqrl.tasks.files), scored by a verifier
    # .jsonl / .csv / .parquet, a datasets directory, or a Hugging Face Hub dataset id (org/name)
    train_file: str | None = None
    test_file: str | None = None  # the held-out problems; None = a tenth of train_file, by hash
    train_split: str | None = None  # the split of a dataset with several; None = "train"
    test_split: str | None = None  # None = "test"
    subset: str | None = None  # a Hub dataset's config name (e.g. "main" for openai/gsm8k)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    # math | code | exact, or your function as "module:function" (f(completion, example) -> float)
    reward: str = "math"
    answer_mode: Literal["auto", "boxed", "gsm8k", "last_number", "final_line"] = "auto"
    prompt_template: str = "{prompt}"
    chat_template: bool = False  # wrap each prompt as a user turn in the tokenizer's chat template
    on_error: Literal["raise", "skip"] = "raise"  # a malformed row: stop, or skip and count
    # the most tokens a prompt may have (a longer one is a malformed row); None = the model's
    # context (max_position_embeddings) minus the generation budget
    max_prompt_tokens: int | None = Field(None, ge=1)
    group_by: str | None = None  # a column: held-out accuracy per value (eval/greedy_acc/<value>)

    @field_validator("reward")
    @classmethod
    def _reward_name(cls, value: str) -> str:
        return _check_reward_name(value)

    def build(self, *, reward_timeout_s: float | None = None):
        """The task this section describes (built-in, or :class:`seqrl.tasks.filetask.FileTask`);
        ``reward_timeout_s`` bounds each call of a user's reward function."""
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
                train_split=self.train_split,
                test_split=self.test_split,
                subset=self.subset,
                hold_out=True,
                reward_timeout_s=reward_timeout_s,
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
    # Testbed (GSPO §5.4): add N(0, σ²) to every sampled token's log μ, as an inference engine
    # whose log-probs differ from the trainer's would; the samples themselves are unchanged. Acts
    # where μ is used: π_old with old_logprobs_source=sampler, or algo.mismatch's ratio π_old/μ.
    logprob_noise: float = Field(0.0, ge=0)
    # fast = seqrl.rollout.fast.FastSampler (one prefill per prompt, lean decode loop that drops
    # finished rows, same samples as generate; falls back to generate where it cannot match it);
    # hf = transformers generate (the reference; any device); vllm = colocated vLLM engine,
    # weights pushed after every optimiser step (CUDA only)
    engine: Literal["hf", "fast", "vllm"] = "fast"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    # DAPO dynamic sampling (Eq. 11): keep only groups whose answers are neither all right nor all
    # wrong, generating further batches of prompts until prompts_per_step groups are kept or
    # max_gen_batches batches were generated (then the step trains on the groups it has).
    dynamic_sampling: bool = False
    gen_batch_prompts: int | None = Field(None, ge=1)  # prompts per generation batch; None = P
    max_gen_batches: int = Field(10, ge=1)
    # Asynchronous rollouts (seqrl.train.rollout_worker): with k ≥ 1 a worker process samples the
    # batches of steps t+1 … t+k while the trainer updates on step t. Step t trains on samples
    # from exactly the policy of k steps earlier (deterministic: same seed, same run); the loss
    # corrects for their age with algo.mismatch (auto: truncated IS). 0 = synchronous.
    max_staleness: int = Field(0, ge=0)


class _LossOverridesBase(_Section):
    """Explicitly set fields of :class:`seqrl.core.PolicyLossConfig`; unset fields read None."""

    def overrides(self) -> dict[str, Any]:
        """The explicitly set fields, in dataclass order (``resolve_policy_loss_config`` kwargs)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}

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
    weight: float = Field(1.0, ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD)


class RewardConfig(_Section):
    """Reward values, extra terms and DAPO's overlong shaping (arXiv 2503.14476, §3.4, Eq. 13)."""

    # reward of a wrong answer (a right one gets 1); DAPO/FIPO use -1
    incorrect: float = Field(0.0, ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD)
    overlong_buffer: int | None = Field(None, ge=1)  # soft punishment window L_cache; None = off
    overlong_penalty_factor: float = Field(1.0, ge=0, le=MAX_ABS_REWARD)  # verl's penalty_factor
    overlong_filter: bool = False  # mask truncated responses out of the loss
    # extra terms added to the verifier's reward, e.g. [{fn: format, weight: 0.1}]
    terms: tuple[RewardTermConfig, ...] = ()
    # seconds each call of a term may take; past it the run stops, resumably, naming the
    # function (calls then run in a worker thread, see seqrl.tasks.rewards); null = no limit
    timeout_s: float | None = Field(60.0, gt=0)
    # KL in the reward (PPO / RLOO / ReMax style, as the SPPO paper's RLOO and ReMax baselines):
    # every response token's reward gets −β·k(log π_old − log π_ref) before the advantages; a
    # frozen reference is built for it. algo.loss.kl_coef is the other placement, in the loss.
    kl_coef: float = Field(0.0, ge=0)  # β; 0 = off
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"


class MismatchConfig(_Section):
    """Correction of π_old/μ (seqrl.core.decoupled_policy_loss): the train–inference mismatch,
    and with ``rollout.max_staleness`` ≥ 1 the samples' age as well.

    correction: none | truncate (w = min(ρ, C), TIS) | mask (w = ρ·1[ρ ≤ C]); auto = none when
    synchronous, truncate with rollout.max_staleness ≥ 1. level: ρ per token, per sequence (the
    product over the response) or sequence_mean (its length-normalised geometric mean); auto =
    token when synchronous, and with rollout.max_staleness ≥ 1 the level of the loss's ratio
    (sequence_mean for GSPO and GSPO-token, token otherwise). cap: C.
    """

    correction: Literal["none", "truncate", "mask", "auto"] = "auto"
    level: Literal["token", "sequence", "sequence_mean", "auto"] = "auto"
    cap: float = Field(2.0, gt=0)


class AlgoConfig(_Section):
    name: str = "gspo"  # one of seqrl.core.POLICY_LOSSES
    # sppo = R − V(prompt) from critic.kind=scalar; gae = GAE from critic.kind=token
    advantage: Literal["group", "group_centered", "rloo", "remax", "sppo", "gae"] = "group"
    adv_eps: float = Field(1e-6, ge=0)
    num_minibatches: int = Field(4, ge=1)  # optimiser steps per rollout batch (per epoch)
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(64, ge=1)  # sequences per forward/backward
    # cut micro-batches by real tokens instead (rows sorted by length, at most this many tokens
    # per forward/backward; a longer row goes alone); None = micro_batch_size rows each
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    # the forward layouts a micro-batch may use; each forward takes the allowed one that runs
    # the fewest token positions (same log-probs and gradients up to float rounding;
    # seqrl.train.forward). shared_prefix: each group's prompt once, the G responses on its KV
    # cache; packing: no padding, sequences end to end with restarting position ids (models that
    # cannot pack exactly run padded, with a warning). Both off = the padded reference layout.
    # An MoE policy's routing record runs padded whatever these say.
    shared_prefix: bool = True
    packing: bool = True
    loss: LossOverrides = Field(default_factory=LossOverrides)
    mismatch: MismatchConfig = Field(default_factory=MismatchConfig)
    # FIPO only: start algo.loss from seqrl.core.FIPO_PRESETS[fipo_preset]; algo.loss still wins.
    fipo_preset: Literal["official_32b", "7b", "ms_swift"] | None = None

    @field_validator("name")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        if name not in POLICY_LOSSES:
            raise ValueError(
                f"unknown algorithm {name!r}{_closest(name, POLICY_LOSSES)} "
                f"(choose one of {', '.join(POLICY_LOSSES)})"
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
    # stop once this much training time (Σ time/step_s: rollout + update, evaluation excluded)
    # has been spent, after the step that crosses it; train.steps stays the upper bound
    time_limit_s: float | None = Field(None, gt=0)


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
    # Testbed knob: in every training forward after a rollout's first optimizer step, re-route
    # this share of the (token, layer) pairs (the weakest of the top-k experts traded for the
    # runner-up), as if the router had moved that much since π_old: routing churn of a chosen
    # size (GSPO §5.3 reports ~10%). Not in sampling, π_old or evaluation. 0 = off.
    reroute_frac: float = Field(0.0, ge=0, lt=1)


class FSDPConfig(_Section):
    """FSDP2 options (``dist.strategy: fsdp``); see docs/scaling.md."""

    # MixedPrecisionPolicy: the dtype of the gathered weights the forward and backward use
    # (None = model.dtype, no casting), and of the gradient reduce-scatter (None = param_dtype).
    # The sharded weights and the AdamW state keep model.dtype (float32 master weights).
    param_dtype: Literal["float32", "bfloat16"] | None = None
    reduce_dtype: Literal["float32", "bfloat16"] | None = None
    cpu_offload: bool = False  # CPUOffloadPolicy: sharded weights, grads, AdamW state in CPU RAM
    reshard_after_forward: bool = True  # False: keep each layer gathered from forward to backward


class DistConfig(_Section):
    """How ``torchrun`` processes share the policy (and critic, and reference)."""

    # replicate = every process holds the whole model, gradients all-reduced (the default);
    # fsdp = FSDP2 fully_shard per decoder layer: weights, gradients and AdamW state sharded
    strategy: Literal["replicate", "fsdp"] = "replicate"
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)


class LogConfig(_Section):
    """Where metrics go besides metrics.jsonl (each backend logs every metric of every step)."""

    tensorboard: Literal["auto", True, False] = "auto"  # auto = if installed
    # Weights & Biases (pip install 'seqrl[wandb]'); WANDB_MODE=offline logs to files only
    wandb: bool = False
    wandb_project: str = "seqrl"
    wandb_entity: str | None = None  # None = your default entity
    # MLflow (pip install 'seqrl[mlflow]'): tracking URI None = MLFLOW_TRACKING_URI, else ./mlruns
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "seqrl"


class HubConfig(_Section):
    """Push ``final/`` to the Hugging Face Hub when the run ends (token: HF_TOKEN or `hf auth login`)."""

    repo_id: str | None = None  # "user/name"; None = no push
    private: bool = True  # visibility of the repository when seqrl creates it


class RunConfig(_Section):
    """One training run. Build it with :func:`~seqrl.config.load_config`; ``preset`` is consumed
    before validation (:mod:`seqrl.config.layers`)."""

    name: str | None = None  # run name; None = "<algo.name>-<YYYYmmdd-HHMMSS>-<hex>" (run_name)
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # CPU threads for torch; None = seqrl.threads' default
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
    hub: HubConfig = Field(default_factory=HubConfig)
    dist: DistConfig = Field(default_factory=DistConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolved_loss(self) -> PolicyLossConfig:
        """The core loss preset ``algo.name`` with :meth:`loss_overrides` applied."""
        return resolve_policy_loss_config(self.algo.name, **self.loss_overrides())

    def resolved_mismatch(self) -> MismatchConfig:
        """``algo.mismatch`` with ``auto`` resolved (see :class:`MismatchConfig`)."""
        m, stale = self.algo.mismatch, self.rollout.max_staleness > 0
        correction = m.correction if m.correction != "auto" else ("truncate" if stale else "none")
        level = m.level
        if level == "auto":
            level = behaviour_level(self.resolved_loss().ratio_level) if stale else "token"
        return MismatchConfig(correction=correction, level=level, cap=m.cap)

    def loss_overrides(self) -> dict[str, Any]:
        """``policy_loss`` keyword arguments: FIPO_PRESETS[algo.fipo_preset], then algo.loss."""
        base = FIPO_PRESETS[self.algo.fipo_preset] if self.algo.fipo_preset else {}
        return {**base, **self.algo.loss.overrides()}

    @cached_property
    def run_name(self) -> str:
        """``name``, or :func:`default_run_name` fixed at first access."""
        return self.name or default_run_name(self.algo.name)

    def to_yaml(self) -> str:
        """The fully resolved config as YAML; ``load_config`` on it gives an equal config."""
        header = "# seqrl run config, fully resolved (presets and overrides applied)\n"
        return header + dump_yaml(self.model_dump(mode="json"))

    def with_overrides(self, overrides: Iterable[str]) -> RunConfig:
        """A validated copy with ``key=value`` overrides applied (e.g. ``name=<run_name>``)."""
        return validate_layers(
            *resolve_layers(self.model_dump(mode="json"), overrides, source="the config")
        )


def default_run_name(algo: str) -> str:
    """``<algo>-<YYYYmmdd-HHMMSS>-<4 hex digits>``, e.g. ``gspo-20261123-172616-9f3a``.

    The random suffix keeps runs started in the same second (a sweep) apart; the trainer
    creates the directory exclusively and draws another name in the rare case of a clash.
    """
    return f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def validate_layers(merged: Mapping, sources: dict[tuple, str]) -> RunConfig:
    """A RunConfig from merged layers; every problem is a :class:`ConfigError` line naming its key
    and the file, preset or override (``sources``) that set it."""
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(
            [describe(e, sources, RunConfig, LAYER_KEYS) for e in err.errors()]
        ) from None
