"""Critics in the training loop: SPPO's scalar prompt critic and PPO-GAE's token critic.

One RL step with a critic (spec §2.2–2.3, §4.4), before the policy update:

    values = critic(batch)            no gradient, θ_critic before its update on this batch
    advantages, returns = estimate(rewards, values)
        scalar: A = R − sigmoid(z) [B], z read at the last prompt token; target the verifier's
                0/1 outcome (with shaped rewards A = R − (r_w + (1 − r_w)·sigmoid(z)))
        token:  GAE(γ, λ) over per-token values [B, T], optionally whitened; targets G_t of the
                shaped reward (mse), or of the 0/1 outcome (bce)
    critic update: epochs × minibatches of BCE-with-logits (scalar; token with token_loss=bce,
        the paper's "PPO + BCE") or PPO's clipped squared error (token, token_loss=mse)

The critic is its own model (:mod:`seqrl.models.critic`) with its own AdamW, LR and schedule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.rollout import RolloutBatch
from seqrl.rollout.base import eval_mode
from seqrl.train import sharding
from seqrl.train.dist import SINGLE, DistInfo, all_reduce_sum, mean_metrics
from seqrl.train.forward import batch_values, prompt_value_logits, row_tokens, token_values
from seqrl.train.optimize import PassSettings, optimizer_params, optimizer_pass


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
    incorrect_reward: float = 0.0  # r_w, the outcome part of a wrong answer's reward (right: 1)
    packing: bool = False  # padding-free forwards where the critic packs exactly (forward.pack)
    max_tokens: int | None = None  # token budget per micro-batch; None = micro_batch_size rows

    @property
    def passes(self) -> PassSettings:
        return PassSettings(
            self.num_minibatches,
            self.ppo_epochs,
            self.micro_batch_size,
            self.grad_clip,
            self.max_tokens,
        )


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
            out = batch_values(
                self.model,
                batch,
                self.kind,
                self.settings.micro_batch_size,
                packing=self.settings.packing,
                max_tokens=self.settings.max_tokens,
            )
        if self.sigmoid_values:
            out = torch.where(batch.response_mask, torch.sigmoid(out), torch.zeros_like(out))
        return out

    def advantages(
        self,
        batch: RolloutBatch,
        rewards: Tensor,
        values: Tensor,
        outcomes: Tensor | None = None,
        kl_penalty: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(advantages, critic targets): scalar ([B], targets [B]); token ([B, T], [B, T]).

        ``rewards`` [B] are the policy's (shaped) rewards; ``outcomes`` [B] the verifier's 0/1
        verdicts (None: ``rewards`` are those verdicts); ``kl_penalty`` [B, T] a KL in the
        reward (:func:`seqrl.core.reward_kl_penalty`; None = none), subtracted from each token's
        reward (token critic) or, summed over tokens, from the sequence reward (scalar critic).
        The scalar critic and the token critic
        with the BCE loss learn P(correct), so their targets come from the outcome; the
        advantages always use the shaped reward. The token critic with the squared error
        regresses on the shaped return, the value of the reward the policy maximises.
        """
        rewards = rewards.to(device=values.device, dtype=values.dtype)
        outcomes = rewards if outcomes is None else outcomes.to(rewards)
        s, mask = self.settings, batch.response_mask
        if self.kind == "scalar":
            if kl_penalty is not None:  # a sequence reward: R − Σ_t p_t
                rewards = rewards - C.masked_sum(kl_penalty.to(rewards), mask, dim=-1)
            adv = C.sppo_advantages(rewards, values, incorrect_reward=s.incorrect_reward)
            return adv, outcomes
        token_rewards = C.token_level_rewards(rewards, mask).to(values.dtype)  # [B, T]
        if kl_penalty is not None:  # r_t − p_t on every valid token
            token_rewards = token_rewards - torch.where(mask, kl_penalty.to(values), 0.0)
        advantages, returns = C.gae_advantages(
            token_rewards, values, mask, gamma=s.gamma, lam=s.lam, whiten=False
        )
        if self.sigmoid_values:  # BCE targets: the returns of the 0/1 outcome alone
            outcome_rewards = C.token_level_rewards(outcomes, mask).to(values.dtype)
            _, returns = C.gae_advantages(
                outcome_rewards, values, mask, gamma=s.gamma, lam=s.lam, whiten=False
            )
        if s.whiten:
            advantages = (
                global_whiten(advantages, mask, self.dist)
                if self.dist.active
                else C.masked_whiten(advantages, mask)
            )
        return advantages, returns

    def update(
        self, batch: RolloutBatch, targets: Tensor, old_values: Tensor, generator: torch.Generator
    ) -> dict[str, float]:
        """``ppo_epochs`` × ``num_minibatches`` AdamW steps on the critic loss; returns metrics.

        The loss normaliser is the minibatch's, so micro-batching does not change the gradient.
        A non-finite loss or gradient skips that step (counted in ``critic/nonfinite_skipped``).
        """
        s, mask = self.settings, batch.response_mask
        # the scalar critic learns V(prompt) from every row's reward, masked response or not
        counted = torch.ones_like(mask[:, :1]) if self.kind == "scalar" else mask  # [B, T or 1]

        def loss_fn(micro: Tensor, total_tokens: Tensor, total_sequences: Tensor) -> C.LossOutput:
            if self.kind == "scalar":
                logits = prompt_value_logits(
                    self.model, batch.prompt_ids[micro], batch.prompt_mask[micro], packing=s.packing
                )  # [b]
                return C.bce_value_loss(logits, targets[micro], total_sequences=total_sequences)
            values = token_values(self.model, batch, micro, packing=s.packing)  # [b, T]
            if self.sigmoid_values:  # PPO + BCE (SPPO §4.3): per-token σ(z_t) vs G_t
                return C.bce_value_loss(
                    values,
                    targets[micro],
                    mask[micro],
                    total_tokens=total_tokens,
                    total_sequences=total_sequences,
                )
            return C.clipped_value_loss(
                values,
                old_values[micro],
                targets[micro],
                mask[micro],
                clip=s.value_clip,
                total_tokens=total_tokens,
                total_sequences=total_sequences,
            )

        self.model.train()
        acc, skipped = optimizer_pass(
            optimizer_params(self.optimizer),  # under FSDP: the shards, whatever is gathered
            self.optimizer,
            loss_fn,
            mask=counted,
            settings=s.passes,
            generator=generator,
            dist=self.dist,
            summed=("critic/loss",),
            grad_norm_key="critic/grad_norm",
            pad=sharding.train_padding(self.model),
            tokens=row_tokens(batch, prompt_only=self.kind == "scalar"),
        )
        self.scheduler.step()
        self.model.eval()
        return mean_metrics(acc, self.dist) | {"critic/nonfinite_skipped": float(skipped)}

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


# ------------------------------------------------------------------------------- one step


def critic_step(
    critic: Critic,
    batch: RolloutBatch,
    rewards: Tensor,
    generator: torch.Generator,
    outcomes: Tensor | None = None,
    kl_penalty: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Values before the update → advantages → critic update; returns (advantages, metrics).

    ``outcomes`` [B]: the verifier's 0/1 verdicts, the target of a critic that learns
    P(correct) (None: ``rewards`` are those verdicts); ``kl_penalty`` [B, T]: a KL in the
    reward. See :meth:`Critic.advantages`.
    """
    values = critic.values(batch)  # [B] logits or [B, T] values, θ_critic before its update
    advantages, targets = critic.advantages(batch, rewards, values, outcomes, kl_penalty)
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
