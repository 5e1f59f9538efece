"""Critics in the training loop: SPPO's scalar prompt critic and PPO-GAE's token critic.

One RL step with a critic (spec §2.2–2.3, §4.4), before the policy update:

    values = critic(batch)            no gradient, θ_critic before its update on this batch
    advantages, returns = estimate(rewards, values)
        scalar: A = R − sigmoid(z) [B], z read at the last prompt token; target R
        token:  GAE(γ, λ) over per-token values [B, T], optionally whitened; targets G_t
    critic update: epochs × minibatches of BCE-with-logits (scalar; token with token_loss=bce,
        the paper's "PPO + BCE") or PPO's clipped squared error (token, token_loss=mse)

The critic is its own model (:mod:`seqrl.models.critic`) with its own AdamW, LR and schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.rollout import RolloutBatch
from seqrl.rollout.hf import eval_mode
from seqrl.train.dist import (
    SINGLE,
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    any_rank,
    reduce_sums,
)
from seqrl.train.metrics import MetricAccumulator
from seqrl.train.step import _trim, global_normalizers, joint_inputs, minibatch_rows


@dataclass(frozen=True)
class CriticSettings:
    """The parts of the run config a critic update needs (no config object enters here)."""

    kind: str  # "scalar" (SPPO) | "token" (PPO-GAE)
    num_minibatches: int
    ppo_epochs: int
    micro_batch_size: int
    grad_clip: float | None
    token_loss: str = "mse"  # token critic: "mse" (clipped, PPO) | "bce" (σ(z_t) vs G_t: PPO + BCE)
    value_clip: float | None = 0.5  # token critic ε_v (mse only)
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True


# ------------------------------------------------------------------------------- forwards


def _wide(x: Tensor) -> Tensor:
    """float32 or wider (bf16 critics are read out in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prompt_value_logits(critic, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """The critic's output at the last prompt token, from a prompt-only forward: [B].

    prompt_ids, prompt_mask [B, Lp] are left-padded, so column −1 is every row's last real
    token; position ids count real tokens only, so left padding does not move the value, and
    no response token is ever passed in (invariant 16).
    """
    ids, mask = _trim(prompt_ids, prompt_mask, left=True)  # [B, Lp']
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = critic(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False)
    return _wide(out.logits[:, -1, 0])  # [B]


def token_values(critic, batch: RolloutBatch, rows: Tensor) -> Tensor:
    """V(s_t) for every response token t of ``rows``: [b, T], 0 on padding.

    s_t = prompt + y_<t, so V(s_t) is read at the position just before token t (the last
    prompt token for t = 0), verl's convention. Same left-padded layout as the policy forward.
    """
    inputs, resp_ids, resp_mask = joint_inputs(batch, rows)  # [b, Lp + T]
    T = resp_ids.shape[1]
    Lp = inputs["input_ids"].shape[1] - T
    out = critic(**inputs, use_cache=False)
    values = _wide(out.logits[:, Lp - 1 : Lp - 1 + T, 0])  # [b, T]
    values = torch.where(resp_mask, values, torch.zeros_like(values))
    return torch.nn.functional.pad(values, (0, batch.response_ids.shape[1] - T))


@torch.no_grad()
def batch_values(critic, batch: RolloutBatch, kind: str, micro_batch_size: int) -> Tensor:
    """Critic outputs for the whole batch without gradient: logits [B] or values [B, T]."""
    B = batch.response_ids.shape[0]
    parts = []
    for s in range(0, B, micro_batch_size):
        rows = torch.arange(s, min(s + micro_batch_size, B))
        if kind == "scalar":
            parts.append(
                prompt_value_logits(critic, batch.prompt_ids[rows], batch.prompt_mask[rows])
            )
        else:
            parts.append(token_values(critic, batch, rows))
    return torch.cat(parts)


def global_whiten(x: Tensor, mask: Tensor, dist: DistInfo, eps: float = 1e-8) -> Tensor:
    """:func:`seqrl.core.masked_whiten` with the mean and unbiased variance over all ranks.

    Two passes, as the one-process version: Σx and n, then Σ(x − mean)². x, mask: [b, T].
    """
    sums = all_reduce_sum(torch.stack([C.masked_sum(x, mask), mask.sum().to(x.dtype)]), dist)
    mean = sums[0] / sums[1].clamp(min=1)
    sq = all_reduce_sum(C.masked_sum((x - mean) ** 2, mask), dist)
    var = sq / (sums[1] - 1.0).clamp(min=1.0)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# ------------------------------------------------------------------------------- the critic


class Critic:
    """A critic model with its optimizer and schedule: values, advantages, one update per step."""

    def __init__(
        self, model, optimizer, scheduler, settings: CriticSettings, dist: DistInfo = SINGLE
    ) -> None:
        if settings.kind not in ("scalar", "token"):
            raise ValueError(f"critic kind must be 'scalar' or 'token', got {settings.kind!r}")
        if settings.token_loss not in ("mse", "bce"):
            raise ValueError(f"token_loss must be 'mse' or 'bce', got {settings.token_loss!r}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.settings = settings
        self.dist = dist

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def sigmoid_values(self) -> bool:
        """True when the token critic's outputs are logits (PPO + BCE): V(s_t) = σ(z_t)."""
        return self.kind == "token" and self.settings.token_loss == "bce"

    def values(self, batch: RolloutBatch) -> Tensor:
        """Logits [B] (scalar) or values [B, T] (token) at the current critic, no gradient."""
        with eval_mode(self.model):
            out = batch_values(self.model, batch, self.kind, self.settings.micro_batch_size)
        if self.sigmoid_values:
            out = torch.where(batch.response_mask, torch.sigmoid(out), torch.zeros_like(out))
        return out

    def advantages(
        self, batch: RolloutBatch, rewards: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(advantages, critic targets): scalar ([B], R [B]); token ([B, T], returns [B, T])."""
        rewards = rewards.to(device=values.device, dtype=values.dtype)
        if self.kind == "scalar":
            return C.sppo_advantages(rewards, values), rewards
        s, mask = self.settings, batch.response_mask
        token_rewards = C.token_level_rewards(rewards, mask).to(values.dtype)
        if not self.dist.active:
            return C.gae_advantages(
                token_rewards, values, mask, gamma=s.gamma, lam=s.lam, whiten=s.whiten
            )
        advantages, returns = C.gae_advantages(
            token_rewards, values, mask, gamma=s.gamma, lam=s.lam, whiten=False
        )
        return (global_whiten(advantages, mask, self.dist) if s.whiten else advantages), returns

    def update(
        self, batch: RolloutBatch, targets: Tensor, old_values: Tensor, generator: torch.Generator
    ) -> dict[str, float]:
        """``ppo_epochs`` × ``num_minibatches`` AdamW steps on the critic loss; returns metrics.

        The loss normaliser is the minibatch's, so micro-batching does not change the gradient.
        A non-finite loss or gradient skips that step (counted in ``critic/nonfinite_skipped``).
        """
        s, mask, dist = self.settings, batch.response_mask, self.dist
        B = batch.response_ids.shape[0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        acc, skipped = MetricAccumulator(), 0
        self.model.train()
        for _ in range(s.ppo_epochs):
            order = torch.randperm(B * dist.world_size, generator=generator)
            for minibatch in minibatch_rows(order, s.num_minibatches, B, dist):
                total_tokens, total_sequences = global_normalizers(mask[minibatch], dist)
                if self.kind == "scalar":  # every row's reward teaches V(prompt), masked or not
                    rows = torch.tensor(minibatch.numel(), dtype=torch.int64)
                    total_sequences = all_reduce_sum(rows, dist).clamp(min=1)
                finite, minibatch_loss = True, torch.zeros((), dtype=torch.float64)
                for micro in minibatch.split(s.micro_batch_size) if minibatch.numel() else ():
                    if self.kind == "scalar":
                        logits = prompt_value_logits(
                            self.model, batch.prompt_ids[micro], batch.prompt_mask[micro]
                        )  # [b]
                        out = C.bce_value_loss(
                            logits, targets[micro], total_sequences=total_sequences
                        )
                    elif self.sigmoid_values:  # PPO + BCE (SPPO §4.3): per-token σ(z_t) vs G_t
                        logits = token_values(self.model, batch, micro)  # [b, T]
                        out = C.bce_value_loss(
                            logits,
                            targets[micro],
                            mask[micro],
                            total_tokens=total_tokens,
                            total_sequences=total_sequences,
                        )
                    else:
                        values = token_values(self.model, batch, micro)  # [b, T]
                        out = C.clipped_value_loss(
                            values,
                            old_values[micro],
                            targets[micro],
                            mask[micro],
                            clip=s.value_clip,
                            total_tokens=total_tokens,
                            total_sequences=total_sequences,
                        )
                    finite &= bool(torch.isfinite(out.loss))
                    out.loss.backward()
                    minibatch_loss += out.loss.detach().double().cpu()  # shares sum to the loss
                    acc.add({k: v for k, v in out.metrics.items() if k != "critic/loss"})
                acc.add({"critic/loss": all_reduce_sum(minibatch_loss, dist)})
                all_reduce_grads(params, dist)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, s.grad_clip if s.grad_clip is not None else math.inf
                )
                finite = not any_rank(not finite, dist)
                if finite and math.isfinite(grad_norm.item()):
                    self.optimizer.step()
                    acc.add({"critic/grad_norm": grad_norm})
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.model.eval()
        means = reduce_sums(acc.sums(), dist) if dist.active else acc.means()
        return means | {"critic/nonfinite_skipped": float(skipped)}

    @torch.no_grad()
    def prompt_predictions(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """The critic's estimate of the prompt's success probability, prompt only: [B].

        scalar: sigmoid(z); token: V(s_0) at the last prompt token (with γ = 1 and a 0/1
        terminal reward its regression target is the success probability as well).
        """
        self.model.eval()
        out = prompt_value_logits(self.model, prompt_ids, prompt_mask)
        return torch.sigmoid(out) if self.kind == "scalar" or self.sigmoid_values else out

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# ------------------------------------------------------------------------------- calibration


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean of their positions), 1-based: [n] → [n] float64."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    for value in torch.unique(x):  # ties: mean rank
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two [n] tensors; NaN when either is constant or n < 2."""
    x, y = x.double(), y.double()
    if x.numel() < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denom if denom > 0 else math.nan


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either is constant."""
    return pearson(_ranks(x), _ranks(y))


CALIBRATION_FILE = "calibration.jsonl"
"""Per eval: one record {step, prompts: [...], predicted: [...], pass_rate: [...]} (seqrl plot)."""


@torch.no_grad()
def eval_predictions(critic: Critic, sampler, examples: list, chunk: int = 256) -> Tensor:
    """The critic's success-probability estimate for each example's prompt: [n] float64."""
    out = []
    for s in range(0, len(examples), chunk):
        prompt_ids, prompt_mask = sampler.encode([e.prompt for e in examples[s : s + chunk]])
        out.append(critic.prompt_predictions(prompt_ids, prompt_mask).double().cpu())
    return torch.cat(out)


def log_calibration(run_dir, step: int, rows: list[dict]) -> None:
    """Append one eval's per-prompt (prompt, predicted, pass_rate) to ``calibration.jsonl``."""
    import json
    from pathlib import Path

    record = {
        "step": step,
        "prompt": [r["prompt"] for r in rows],
        "predicted": [r["predicted"] for r in rows],
        "pass_rate": [r["pass_rate"] for r in rows],
    }
    with open(Path(run_dir) / CALIBRATION_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def pass_rates(hits: Tensor, k: int) -> Tensor:
    """Per-prompt pass rate from k samples each, rows prompt-major (i·k … i·k + k − 1): [n·k] → [n]."""
    return hits.double().view(-1, k).mean(dim=1)


def calibration_metrics(predicted: Tensor, pass_rate: Tensor) -> dict[str, float]:
    """``critic/calibration_*``: the critic's prediction vs the empirical pass rate per prompt."""
    predicted, pass_rate = predicted.double(), pass_rate.double()
    return {
        "critic/calibration_pearson": pearson(predicted, pass_rate),
        "critic/calibration_spearman": spearman(predicted, pass_rate),
        "critic/calibration_pred_mean": float(predicted.mean()),
        "critic/calibration_pass_rate_mean": float(pass_rate.mean()),
        "critic/calibration_abs_err": float((predicted - pass_rate).abs().mean()),
    }


# ------------------------------------------------------------------------------- from a config


def critic_from_config(
    cfg, policy, tokenizer, device: torch.device, dist: DistInfo = SINGLE
) -> Critic | None:
    """The run's critic (None for ``critic.kind: none``): model, AdamW and LR schedule.

    ``cfg`` is a :class:`seqrl.config.RunConfig`; the critic is float32 (its BCE/MSE targets are
    probabilities and returns, and it is small next to the policy in every preset).
    """
    from seqrl.models.critic import build_critic
    from seqrl.models.lora import apply_lora
    from seqrl.train.trainer import lr_lambda

    c = cfg.critic
    if c.kind == "none":
        return None
    model = build_critic(c.model, policy, tokenizer, seed=cfg.seed).to(device)
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
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=c.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=c.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(c.schedule, c.lr_warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio),
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
    )
    return Critic(model, optimizer, scheduler, settings, dist)


def critic_step(
    critic: Critic, batch: RolloutBatch, rewards: Tensor, generator: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Values before the update → advantages → critic update; returns (advantages, metrics)."""
    values = critic.values(batch)  # [B] logits or [B, T] values, θ_critic before its update
    advantages, targets = critic.advantages(batch, rewards, values)
    lr = critic.optimizer.param_groups[0]["lr"]
    metrics = critic.update(batch, targets, values, generator)
    if critic.kind == "scalar":
        metrics["critic/pred_mean"] = torch.sigmoid(values).mean().item()
        metrics["critic/advantage_mean"] = advantages.mean().item()
    else:
        mask = batch.response_mask
        metrics["critic/pred_mean"] = C.masked_mean(values, mask).item()
        metrics["critic/advantage_mean"] = C.masked_mean(advantages, mask).item()
    metrics["critic/lr"] = lr
    return advantages, metrics
