"""From a run config to what a run trains with: models, optimisers, schedules, sampler, critic, data.

Every builder reads the config sections it needs and returns plain objects; no builder keeps
state, so :class:`seqrl.train.trainer.Trainer` is the only place they meet. The call order
in the trainer is part of a run's reproducibility: the frozen reference and the critic copy
the policy before LoRA adapters are drawn from the global random stream.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch

from seqrl.config import OptimConfig, RunConfig
from seqrl.core import PolicyLossConfig
from seqrl.evaluation import check_group_by
from seqrl.models import load_policy
from seqrl.models.critic import build_critic as build_critic_model
from seqrl.models.load import enable_gradient_checkpointing
from seqrl.models.lora import AdaptersOff, apply_lora
from seqrl.models.moe import is_moe
from seqrl.rollout import FastSampler, HFSampler, Sampler
from seqrl.tasks.files import DataError
from seqrl.tasks.lengths import check_prompt_lengths, context_length, prompt_limit
from seqrl.tasks.prompts import rendered
from seqrl.tasks.rewards import resolve_terms
from seqrl.train import dist as dist_lib
from seqrl.train import sharding
from seqrl.train.critic import Critic, CriticSettings
from seqrl.train.dist import DistInfo
from seqrl.train.routing import RolloutRouting
from seqrl.train.sampling import SamplingSettings
from seqrl.train.step import UpdateSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``device: auto | cpu | cuda`` → this process's device (its local rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


# ------------------------------------------------------------------ optimisers and schedules


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """LR multiplier per RL step: linear warm-up, then constant or cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    module: torch.nn.Module, o: OptimConfig, *, lr: float | None = None, weight_decay=None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (with LoRA: the adapters), ``optim.*`` settings.

    The fused implementation (one kernel per step instead of about ten passes over every
    tensor; what transformers' Trainer uses by default) wherever all parameters allow it: the
    same update up to float rounding, about 2.7× faster than the default on a CPU.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=o.lr if lr is None else lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay if weight_decay is None else weight_decay,
        fused=fused_adamw_applies(params),
    )


def fused_adamw_applies(params: list[torch.nn.Parameter]) -> bool:
    """True when torch's fused AdamW kernel takes every one of ``params``: floating point, all
    on one CPU or CUDA device (and not meta tensors)."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(
            p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params
        )
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """One scheduler step per RL step (see :func:`lr_lambda`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(schedule, warmup, total, min_ratio)
    )


# ------------------------------------------------------------------ models


def _home(cfg: RunConfig, device: torch.device) -> torch.device:
    """Where a model is built: ``device``, or the CPU under FSDP, whose ``fully_shard`` moves
    each layer to the device as it shards it (the device never holds a whole model)."""
    return torch.device("cpu") if cfg.dist.strategy == "fsdp" else device


def build_policy(cfg: RunConfig, device: torch.device, dist: DistInfo):
    """(policy, tokenizer): ``model.policy`` in ``model.dtype`` on ``device`` (on the CPU
    until it is sharded, under FSDP), equal on all ranks."""
    model, tokenizer = load_policy(cfg.model.policy)
    model.to(_home(cfg, device), DTYPES[cfg.model.dtype])
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    dist_lib.broadcast_module(model, dist)  # replicas start identical
    return model, tokenizer


def build_reference(cfg: RunConfig, policy, loss: PolicyLossConfig, device: torch.device):
    """The frozen π_ref of a KL term: ``model.reference``, or a copy of the initial policy.

    None without a KL term (in the loss or the reward), and None with LoRA and no
    ``model.reference``: then the policy with its adapters off is π_ref (:func:`add_lora`),
    which costs no second copy.
    """
    if not needs_reference(cfg, loss) or not (cfg.model.reference or not cfg.model.lora.r):
        return None
    if cfg.model.reference:
        ref = load_policy(cfg.model.reference)[0].to(_home(cfg, device), DTYPES[cfg.model.dtype])
    else:
        ref = copy.deepcopy(policy)
    return ref.eval().requires_grad_(False)


def needs_reference(cfg: RunConfig, loss: PolicyLossConfig) -> bool:
    """A frozen π_ref is needed for a KL term in the loss or in the reward."""
    return bool(loss.kl_coef or cfg.reward.kl_coef)


def add_lora(cfg: RunConfig, policy, reference, loss: PolicyLossConfig, dist: DistInfo):
    """(policy, reference) with ``model.lora`` adapters on the policy (unchanged when r = 0)."""
    lora = cfg.model.lora
    if not lora.r:
        return policy, reference
    policy = apply_lora(policy, r=lora.r, alpha=lora.alpha, target_modules=lora.target_modules)
    if needs_reference(cfg, loss) and reference is None:
        reference = AdaptersOff(policy)
    dist_lib.broadcast_module(policy, dist)  # the same random adapters everywhere
    return policy, reference


def build_critic(
    cfg: RunConfig, policy, tokenizer, device: torch.device, dist: DistInfo, mesh=None
):
    """The run's critic (None for ``critic.kind: none``): model, AdamW and LR schedule.

    The critic is float32 (its BCE/MSE targets are probabilities and returns, and it is small
    next to the policy in every preset); it starts equal on every rank. With a device ``mesh``
    (``dist.strategy: fsdp``) it is sharded before its optimiser is made.
    """
    c = cfg.critic
    if c.kind == "none":
        return None
    model = build_critic_model(c.model, policy, tokenizer, seed=cfg.seed).to(_home(cfg, device))
    if c.lora:  # adapters on the backbone, the fresh value head trained in full
        lora = cfg.model.lora
        model = apply_lora(
            model,
            r=lora.r,
            alpha=lora.alpha,
            target_modules=lora.target_modules,
            task_type="TOKEN_CLS",
            modules_to_save=["score"],
        )
    dist_lib.broadcast_module(model, dist)
    if mesh is not None:
        model = sharding.shard_model(model, mesh, shard_settings(cfg))
    optimizer = build_optimizer(model, cfg.optim, lr=c.lr, weight_decay=c.weight_decay)
    scheduler = build_scheduler(
        optimizer, c.schedule, c.lr_warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio
    )
    settings = CriticSettings(
        kind=c.kind,
        num_minibatches=c.num_minibatches or cfg.algo.num_minibatches,
        ppo_epochs=c.ppo_epochs,
        micro_batch_size=cfg.algo.micro_batch_size,
        grad_clip=c.grad_clip,
        token_loss=c.token_loss,
        value_clip=c.value_clip,
        gamma=c.gamma,
        lam=c.lam,
        whiten=c.whiten,
        incorrect_reward=cfg.reward.incorrect,
        packing=cfg.algo.packing,
        max_tokens=cfg.algo.max_tokens_per_micro_batch,
    )
    return Critic(model, optimizer, scheduler, settings, dist)


def shard_settings(cfg: RunConfig) -> sharding.ShardSettings:
    f = cfg.dist.fsdp
    return sharding.ShardSettings(
        param_dtype=f.param_dtype,
        reduce_dtype=f.reduce_dtype,
        cpu_offload=f.cpu_offload,
        reshard_after_forward=f.reshard_after_forward,
    )


def build_mesh(cfg: RunConfig, device: torch.device):
    """The device mesh FSDP shards over (``dist.strategy: fsdp``); None for ``replicate``."""
    return sharding.device_mesh(device) if cfg.dist.strategy == "fsdp" else None


def shard_policy(cfg: RunConfig, policy, reference, mesh):
    """(policy, reference) sharded with FSDP2 over ``mesh`` (unchanged when ``mesh`` is None).

    Called after LoRA is added (the adapters are sharded with their layers) and before the
    policy's optimiser is made (it must hold the sharded parameters). A reference that is the
    policy with its adapters off shares the policy's shards.
    """
    if mesh is None:
        return policy, reference
    settings = shard_settings(cfg)
    policy = sharding.shard_model(policy, mesh, settings)
    if isinstance(reference, torch.nn.Module):
        reference = sharding.shard_model(reference, mesh, settings)
    return policy, reference


def build_routing(cfg: RunConfig, policy) -> RolloutRouting | None:
    """An MoE policy's routing record (``moe/*`` metrics, Routing Replay); None when dense."""
    if cfg.moe.reroute_frac and not is_moe(policy):
        raise ValueError(
            f"moe.reroute_frac={cfg.moe.reroute_frac:g} re-routes an MoE policy's tokens, but "
            f"{cfg.model.policy} has no supported MoE router; use an MoE policy such as "
            "builtin:tiny-moe-addition-noisy, or moe.reroute_frac=0"
        )
    if not (cfg.moe.routing_replay or is_moe(policy)):
        return None
    # the routing is recorded in the padded layout: the policy's forwards then run padded
    # whatever algo.shared_prefix and algo.packing say (seqrl.train.forward.response_logprobs)
    return RolloutRouting(policy, replay=cfg.moe.routing_replay, reroute_frac=cfg.moe.reroute_frac)


# ------------------------------------------------------------------ rollouts and data


def build_sampler(
    cfg: RunConfig,
    policy,
    tokenizer,
    *,
    max_new_tokens: int,
    device: torch.device,
    run_dir: Path,
    dist: DistInfo,
) -> Sampler:
    """The ``rollout.engine``: HFSampler or FastSampler (any device), or colocated vLLM."""
    r = cfg.rollout
    common = dict(max_new_tokens=max_new_tokens, temperature=r.temperature, top_p=r.top_p)
    if r.engine in ("hf", "fast"):
        sampler_cls = FastSampler if r.engine == "fast" else HFSampler
        sampler = sampler_cls(policy, tokenizer, **common)
        if sharding.is_sharded(policy):  # generate on the gathered weights
            reshard = cfg.dist.fsdp.reshard_after_forward
            return sharding.GatheredSampler(sampler, policy, device, reshard)
        return sampler
    from seqrl.rollout.vllm import VLLMSampler

    if device.type != "cuda":
        raise ValueError(
            f"rollout.engine=vllm needs a CUDA device, but the run is on {device}; "
            "use rollout.engine=hf"
        )
    v = r.vllm
    return VLLMSampler(
        policy,
        tokenizer,
        work_dir=run_dir / f".vllm-rank{dist.rank}",
        gpu_memory_utilization=v.gpu_memory_utilization,
        max_model_len=v.max_model_len,
        enforce_eager=v.enforce_eager,
        dtype=_vllm_dtype(cfg),
        seed=cfg.seed,
        world_size=dist.world_size,
        **common,
    )


def _vllm_dtype(cfg: RunConfig) -> str:
    """``rollout.vllm.dtype``; ``auto`` under FSDP mixed precision is the compute dtype."""
    dtype, param_dtype = cfg.rollout.vllm.dtype, cfg.dist.fsdp.param_dtype
    if dtype == "auto" and cfg.dist.strategy == "fsdp" and param_dtype is not None:
        return param_dtype
    return dtype


def build_task_data(cfg: RunConfig, tokenizer, model=None):
    """(task, train examples, eval examples): prompts as the policy sees them (template, chat;
    :mod:`seqrl.tasks.prompts`, the same for ``seqrl sft`` and ``seqrl eval``).

    Every prompt must fit in ``task.max_prompt_tokens`` tokens, by default the model's context
    minus the generation budget (:mod:`seqrl.tasks.lengths`; no check without either). A longer
    prompt is a :class:`~seqrl.tasks.files.DataError` naming its file and row, or with
    ``task.on_error=skip`` (data files) is left out and counted in the task's ``reports``.
    """
    task = cfg.task.build(reward_timeout_s=cfg.reward.timeout_s)
    train = task.examples("train", min(cfg.task.train_size, task.max_examples("train")))
    test = task.examples("test", min(cfg.task.eval_size, task.max_examples("test")))
    if cfg.task.group_by:  # a misspelt column fails here, not at the first evaluation
        check_group_by(test, cfg.task.group_by)
    chat = cfg.task.chat_template  # the prompts the policy sees; verification is unchanged
    train, test = rendered(tokenizer, train, chat=chat), rendered(tokenizer, test, chat=chat)
    context = context_length(model)
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.max_model_len:
        context = min(context or cfg.rollout.vllm.max_model_len, cfg.rollout.vllm.max_model_len)
    budget = cfg.rollout.max_new_tokens or task.max_new_tokens
    limit, why = prompt_limit(cfg.task.max_prompt_tokens, context, max_new_tokens=budget)
    if limit is not None:
        train, test = (
            _fitting(cfg, task, tokenizer, examples, limit, why, split)
            for examples, split in ((train, "train"), (test, "test"))
        )
    return task, train, test


def _fitting(cfg: RunConfig, task, tokenizer, examples: list, limit: int, why: str, split: str):
    """The examples whose prompt fits in ``limit`` tokens; file rows left out are counted."""
    reports = getattr(task, "reports", {})
    if split in reports:  # rows of a data file
        kw = dict(on_error=cfg.task.on_error)
    else:  # a generated prompt: the budget, not the data, is wrong
        kw = dict(fix="lower rollout.max_new_tokens, or set task.max_prompt_tokens")
    kept, problems = check_prompt_lengths(examples, tokenizer, limit, why=why, split=split, **kw)
    if problems:
        r = reports[split]
        reports[split] = dataclasses.replace(
            r, skipped=r.skipped + len(problems), first_problems=(*r.first_problems, *problems)[:5]
        )
    if not kept:
        raise DataError(
            f"no prompt of the {split} split fits in {limit} tokens ({why}); "
            f"first: {problems[0] if problems else '-'}"
        )
    return kept


def data_notes(task) -> list[str]:
    """One line per data file with skipped rows (``task.on_error=skip``), for the console."""
    return [
        f"{split} data {r.path}: {r.skipped} of {r.rows} rows skipped (task.on_error=skip); "
        f"first: {r.first_problems[0]}"
        for split, r in getattr(task, "reports", {}).items()
        if r.skipped
    ]


# ------------------------------------------------------------------ logging


def build_trackers(cfg: RunConfig, run_dir: Path, dist: DistInfo) -> list:
    """The ``log.wandb`` / ``log.mlflow`` trackers of rank 0 (:mod:`seqrl.train.metrics`)."""
    from seqrl.config import ConfigError
    from seqrl.train.metrics import TrackerError, open_trackers

    log = cfg.log
    if not dist.is_main or not (log.wandb or log.mlflow):
        return []
    wandb = {"project": log.wandb_project, "entity": log.wandb_entity} if log.wandb else None
    mlflow = None
    if log.mlflow:
        mlflow = {"tracking_uri": log.mlflow_tracking_uri, "experiment": log.mlflow_experiment}
    try:
        return open_trackers(
            run_dir,
            name=run_dir.name,
            config=cfg.model_dump(mode="json"),
            wandb=wandb,
            mlflow=mlflow,
        )
    except TrackerError as err:
        raise ConfigError(str(err)) from None


# ------------------------------------------------------------------ settings


def sampling_settings(cfg: RunConfig, task, max_new_tokens: int) -> SamplingSettings:
    """What the data side of a step needs: G, P, dynamic sampling, reward shaping and terms."""
    r, rw = cfg.rollout, cfg.reward
    return SamplingSettings(
        group_size=r.group_size,
        prompts_per_step=r.prompts_per_step,
        max_new_tokens=max_new_tokens,
        dynamic=r.dynamic_sampling,
        gen_batch_prompts=r.gen_batch_prompts,
        max_gen_batches=r.max_gen_batches,
        incorrect_reward=rw.incorrect,
        overlong_buffer=rw.overlong_buffer,
        overlong_penalty_factor=rw.overlong_penalty_factor,
        overlong_filter=rw.overlong_filter,
        reward_terms=resolve_terms(
            [(t.fn, t.weight) for t in rw.terms], task, timeout_s=rw.timeout_s
        ),
    )


def update_settings(cfg: RunConfig) -> UpdateSettings:
    """What the policy update needs; the loss is resolved here, once per run."""
    a, m = cfg.algo, cfg.resolved_mismatch()
    return UpdateSettings(
        loss_name=a.name,
        loss_overrides=cfg.loss_overrides(),
        num_minibatches=a.num_minibatches,
        ppo_epochs=a.ppo_epochs,
        micro_batch_size=a.micro_batch_size,
        grad_clip=cfg.optim.grad_clip,
        temperature=cfg.rollout.temperature,
        mismatch_correction=m.correction,
        mismatch_level=m.level,
        mismatch_cap=m.cap,
        shared_prefix=a.shared_prefix,
        packing=a.packing,
        max_tokens_per_micro_batch=a.max_tokens_per_micro_batch,
    )
