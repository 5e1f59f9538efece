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
from seqrl.models import chat_prompts, load_policy
from seqrl.models.critic import build_critic as build_critic_model
from seqrl.models.load import enable_gradient_checkpointing
from seqrl.models.lora import AdaptersOff, apply_lora
from seqrl.models.moe import is_moe
from seqrl.rollout import FastSampler, HFSampler, Sampler
from seqrl.tasks.rewards import resolve_terms
from seqrl.train import dist as dist_lib
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
    """AdamW over the trainable parameters (with LoRA: the adapters), ``optim.*`` settings."""
    return torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=o.lr if lr is None else lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay if weight_decay is None else weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """One scheduler step per RL step (see :func:`lr_lambda`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(schedule, warmup, total, min_ratio)
    )


# ------------------------------------------------------------------ models


def build_policy(cfg: RunConfig, device: torch.device, dist: DistInfo):
    """(policy, tokenizer): ``model.policy`` in ``model.dtype`` on ``device``, equal on all ranks."""
    model, tokenizer = load_policy(cfg.model.policy)
    model.to(device, DTYPES[cfg.model.dtype])
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    dist_lib.broadcast_module(model, dist)  # replicas start identical
    return model, tokenizer


def build_reference(cfg: RunConfig, policy, loss: PolicyLossConfig, device: torch.device):
    """The frozen π_ref of a KL term: ``model.reference``, or a copy of the initial policy.

    None without a KL term, and None with LoRA and no ``model.reference``: then the policy with
    its adapters off is π_ref (:func:`add_lora`), which costs no second copy.
    """
    if not loss.kl_coef or not (cfg.model.reference or not cfg.model.lora.r):
        return None
    if cfg.model.reference:
        ref = load_policy(cfg.model.reference)[0].to(device, DTYPES[cfg.model.dtype])
    else:
        ref = copy.deepcopy(policy)
    return ref.eval().requires_grad_(False)


def add_lora(cfg: RunConfig, policy, reference, loss: PolicyLossConfig, dist: DistInfo):
    """(policy, reference) with ``model.lora`` adapters on the policy (unchanged when r = 0)."""
    lora = cfg.model.lora
    if not lora.r:
        return policy, reference
    policy = apply_lora(policy, r=lora.r, alpha=lora.alpha, target_modules=lora.target_modules)
    if loss.kl_coef and reference is None:
        reference = AdaptersOff(policy)
    dist_lib.broadcast_module(policy, dist)  # the same random adapters everywhere
    return policy, reference


def build_critic(cfg: RunConfig, policy, tokenizer, device: torch.device, dist: DistInfo):
    """The run's critic (None for ``critic.kind: none``): model, AdamW and LR schedule.

    The critic is float32 (its BCE/MSE targets are probabilities and returns, and it is small
    next to the policy in every preset); it starts equal on every rank.
    """
    c = cfg.critic
    if c.kind == "none":
        return None
    model = build_critic_model(c.model, policy, tokenizer, seed=cfg.seed).to(device)
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
        packing=cfg.algo.packing,
        max_tokens=cfg.algo.max_tokens_per_micro_batch,
    )
    dist_lib.broadcast_module(model, dist)
    return Critic(model, optimizer, scheduler, settings, dist)


def build_routing(cfg: RunConfig, policy) -> RolloutRouting | None:
    """An MoE policy's routing record (``moe/*`` metrics, Routing Replay); None when dense."""
    if not (cfg.moe.routing_replay or is_moe(policy)):
        return None
    # the routing is recorded in the padded layout: the policy's forwards then run padded
    # whatever algo.shared_prefix and algo.packing say (seqrl.train.forward.response_logprobs)
    return RolloutRouting(policy, replay=cfg.moe.routing_replay)


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
        return sampler_cls(policy, tokenizer, **common)
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
        dtype=v.dtype,
        seed=cfg.seed,
        world_size=dist.world_size,
        **common,
    )


def build_task_data(cfg: RunConfig, tokenizer):
    """(task, train examples, eval examples): prompts as the policy sees them (chat template)."""
    task = cfg.task.build()
    train = task.examples("train", min(cfg.task.train_size, task.max_examples("train")))
    test = task.examples("test", min(cfg.task.eval_size, task.max_examples("test")))
    if cfg.task.chat_template:  # the prompts the policy sees; verification is unchanged
        train, test = _in_chat(tokenizer, train), _in_chat(tokenizer, test)
    return task, train, test


def _in_chat(tokenizer, examples: list) -> list:
    """``examples`` with each prompt wrapped as a user turn of the tokenizer's chat template."""
    prompts = chat_prompts(tokenizer, [e.prompt for e in examples])
    return [dataclasses.replace(e, prompt=p) for e, p in zip(examples, prompts, strict=True)]


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
        reward_terms=resolve_terms([(t.fn, t.weight) for t in rw.terms], task),
    )


def update_settings(cfg: RunConfig) -> UpdateSettings:
    """What the policy update needs; the loss is resolved here, once per run."""
    a, m = cfg.algo, cfg.algo.mismatch
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
