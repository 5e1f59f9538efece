"""The training loop: data order, rollouts, rewards, updates, evaluation, checkpoints, logging.

``Trainer(cfg).fit()`` runs a whole run; ``Trainer.resume(run_dir).fit()`` continues one. One
step is :func:`Trainer.train_step`; the maths it calls lives in :mod:`seqrl.core` and
:mod:`seqrl.train.step`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from seqrl.config import RunConfig, load_config
from seqrl.models import chat_prompts, load_policy, save_policy
from seqrl.models.critic import save_critic
from seqrl.rollout import HFSampler
from seqrl.rollout.fast import FastSampler
from seqrl.train import checkpoint as ckpt
from seqrl.train import critic as critic_lib
from seqrl.train.dist import DistInfo, init_from_env, reduce_metrics, shard
from seqrl.train.metrics import RunLogger, truncate_jsonl
from seqrl.train.sampling import SamplingSettings, collect_rollout, shaped_rewards, side_stream
from seqrl.train.step import (
    UpdateSettings,
    batch_logprobs,
    compute_advantages,
    score_rollout,
    update_policy,
)


class TrainingAbortedError(RuntimeError):
    """Raised when training cannot continue (e.g. repeated non-finite updates)."""


@dataclass
class TrainState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    wall_time_s: float = 0.0
    evals: dict = field(default_factory=dict)  # step → {"eval/greedy_acc": ..., ...}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _in_chat(tokenizer, examples: list) -> list:
    """``examples`` with each prompt wrapped as a user turn of the tokenizer's chat template."""
    prompts = chat_prompts(tokenizer, [e.prompt for e in examples])
    return [dataclasses.replace(e, prompt=p) for e, p in zip(examples, prompts, strict=True)]


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


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        run_dir: Path | None = None,
        console: Console | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_from_env()
        self.console = console or Console()
        self.show_progress = progress
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.run_name
        self.device = _device(cfg.device)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.model, self.tokenizer = load_policy(cfg.model.policy)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self.model.to(self.device, dtype)
        self.loss_cfg = cfg.resolved_loss()
        self.ref_model = None
        if self.loss_cfg.kl_coef:
            ref_source = cfg.model.reference
            self.ref_model = (
                load_policy(ref_source)[0].to(self.device, dtype)
                if ref_source
                else copy.deepcopy(self.model)
            )
            self.ref_model.eval().requires_grad_(False)

        self.task = cfg.task.build()
        self.train_examples = self.task.examples(
            "train", min(cfg.task.train_size, self.task.max_examples("train"))
        )
        self.eval_examples = self.task.examples(
            "test", min(cfg.task.eval_size, self.task.max_examples("test"))
        )
        if cfg.task.chat_template:  # the prompts the policy sees; verification is unchanged
            self.train_examples = _in_chat(self.tokenizer, self.train_examples)
            self.eval_examples = _in_chat(self.tokenizer, self.eval_examples)
        self.max_new_tokens = cfg.rollout.max_new_tokens or self.task.max_new_tokens
        sampler_cls = FastSampler if cfg.rollout.sampler == "fast" else HFSampler
        self.sampler = sampler_cls(
            self.model,
            self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
        )

        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.schedule, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)
        )
        a = cfg.algo
        self.update_settings = UpdateSettings(
            loss_name=a.name,
            loss_overrides=cfg.loss_overrides(),
            num_minibatches=a.num_minibatches,
            ppo_epochs=a.ppo_epochs,
            micro_batch_size=a.micro_batch_size,
            grad_clip=o.grad_clip,
            temperature=cfg.rollout.temperature,
            shared_prefix=a.shared_prefix,
        )
        # critic (SPPO / PPO-GAE): its own model, optimizer and schedule; None without one
        self.critic = critic_lib.critic_from_config(cfg, self.model, self.tokenizer, self.device)
        r = cfg.rollout
        if r.dynamic_sampling and self.dist.world_size > 1:
            raise NotImplementedError(
                "rollout.dynamic_sampling runs in one process only for now; "
                "set rollout.dynamic_sampling=false for multi-process runs"
            )
        self.sampling_settings = SamplingSettings(
            group_size=r.group_size,
            prompts_per_step=r.prompts_per_step,
            max_new_tokens=self.max_new_tokens,
            dynamic=r.dynamic_sampling,
            gen_batch_prompts=r.gen_batch_prompts,
            max_gen_batches=r.max_gen_batches,
            incorrect_reward=cfg.reward.incorrect,
            overlong_buffer=cfg.reward.overlong_buffer,
            overlong_penalty_factor=cfg.reward.overlong_penalty_factor,
            overlong_filter=cfg.reward.overlong_filter,
        )
        self.state = TrainState()
        self.logger: RunLogger | None = None
        self._order, self._order_epoch = None, None  # cached shuffle of the current data epoch

    # ------------------------------------------------------------------ set-up and resume
    @classmethod
    def resume(cls, run_dir: Path, **kwargs) -> Trainer:
        """Continue the run in ``run_dir`` from its newest complete checkpoint."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a seqrl run directory?")
        trainer = cls(load_config(str(config_path)), run_dir=run_dir, **kwargs)
        latest = ckpt.load_latest(run_dir / "checkpoints")
        if latest is None:
            raise FileNotFoundError(
                f"{run_dir}/checkpoints has no complete checkpoint to resume from; "
                f"start the run again with `seqrl train {config_path}`"
            )
        trainer._restore(latest)
        return trainer

    def _restore(self, c: ckpt.Checkpoint) -> None:
        c.load_weights(self.model)
        self.optimizer.load_state_dict(c.state["optimizer"])
        self.scheduler.load_state_dict(c.state["scheduler"])
        self.state = TrainState(**c.state["trainer"])
        if self.critic is not None:
            self.critic.load_state_dict(c.state["critic"])
        ckpt.set_rng_state(c.state["rng"])
        for name in ("metrics.jsonl", "samples.jsonl", critic_lib.CALIBRATION_FILE):
            truncate_jsonl(self.run_dir / name, self.state.step)
        self.console.print(f"resumed {self.run_dir} from {c.path.name}")

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": vars(self.state).copy(),
            "rng": ckpt.rng_state(),
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
        ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.state.step,
            self.model,
            state,
            keep=self.cfg.train.keep_checkpoints,
        )

    # ------------------------------------------------------------------ data
    def step_prompts(self, step: int) -> list:
        """The P examples of RL step ``step`` (1-based): epochs of seeded shuffles, no state."""
        P, N = self.cfg.rollout.prompts_per_step, len(self.train_examples)
        picked = []
        for i in range((step - 1) * P, step * P):
            epoch, pos = divmod(i, N)
            picked.append(self.train_examples[int(self._epoch_order(epoch)[pos])])
        return shard(picked, self.dist)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order, self._order_epoch = (
                torch.randperm(len(self.train_examples), generator=gen),
                epoch,
            )
        return self._order

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.rollout.group_size
        t0 = time.perf_counter()
        # rollout, rewards, DAPO dynamic sampling and overlong shaping (seqrl.train.sampling)
        side = side_stream(len(self.train_examples), seed=cfg.seed, step=step)
        rollout = collect_rollout(
            self.sampler,
            self.tokenizer,
            self.task,
            self.step_prompts(step),
            lambda start, n: [
                self.train_examples[int(side[i % len(side)])] for i in range(start, start + n)
            ],
            self.sampling_settings,
        )
        examples, batch, texts, rewards = (
            rollout.examples,
            rollout.batch,
            rollout.texts,
            rollout.rewards,
        )
        greedy_rewards = None
        if cfg.algo.advantage == "remax" and examples:
            greedy = self.sampler.generate([e.prompt for e in examples], group_size=1, greedy=True)
            _, scores = score_rollout(self.tokenizer, self.task, greedy, examples)
            greedy_rewards = shaped_rewards(scores > 0, greedy.lengths, self.sampling_settings)
        t_rollout = time.perf_counter() - t0
        critic_metrics = {}
        if not examples:  # dynamic sampling kept no group: nothing to learn from
            advantages = rewards  # [0]
        elif self.critic is not None:  # values before the critic's update, then its update
            critic_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 500_000)
            advantages, critic_metrics = critic_lib.critic_step(
                self.critic, batch, rewards, critic_gen
            )
            critic_metrics["time/critic_s"] = time.perf_counter() - t0 - t_rollout
        else:
            advantages = compute_advantages(
                cfg.algo.advantage, rewards, G, eps=cfg.algo.adv_eps, greedy_rewards=greedy_rewards
            )

        micro = cfg.algo.micro_batch_size
        temperature = cfg.rollout.temperature
        if cfg.rollout.old_logprobs_source == "sampler":
            old_logprobs = batch.sampler_logprobs
        elif cfg.algo.num_minibatches * cfg.algo.ppo_epochs == 1:
            old_logprobs = None  # one on-policy update: π_old is the update's own forward, detached
        else:
            old_logprobs = batch_logprobs(
                self.model,
                batch,
                temperature=temperature,
                micro_batch_size=micro,
                shared_prefix=cfg.algo.shared_prefix,
            )
        ref_logprobs = None
        if self.ref_model is not None:
            ref_logprobs = batch_logprobs(
                self.ref_model,
                batch,
                temperature=temperature,
                micro_batch_size=micro,
                shared_prefix=cfg.algo.shared_prefix,
            )
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        lr = self.optimizer.param_groups[0]["lr"]
        train_metrics, skipped = {}, 0
        critic_warmup = self.critic is not None and step <= cfg.critic.warmup_steps
        if len(texts) and not critic_warmup:  # no group kept, or the critic warming up: no update
            train_metrics, skipped = update_policy(
                self.model,
                self.optimizer,
                batch,
                advantages,
                old_logprobs,
                ref_logprobs,
                self.update_settings,
                generator,
            )
        with (
            warnings.catch_warnings()
        ):  # all updates skipped (non-finite) still advance the schedule
            warnings.filterwarnings(
                "ignore", message=re.escape("Detected call of `lr_scheduler.step()`")
            )
            self.scheduler.step()
        t_step = time.perf_counter() - t0

        lengths = batch.lengths.double()
        metrics = {
            **rollout.metrics,  # reward/*, train/accuracy, response_len/*, sampling/*
            "train/lr": lr,
            "train/nonfinite_skipped": float(skipped),
            **train_metrics,
            **critic_metrics,
            "time/rollout_s": t_rollout,
            "time/train_s": t_step - t_rollout,
            "time/step_s": t_step,
            "throughput/tokens_per_s": lengths.sum().item() / t_step,
        }
        if greedy_rewards is not None:
            metrics["reward/greedy_mean"] = greedy_rewards.mean().item()
        metrics = reduce_metrics(metrics, self.dist)
        if self.logger is not None:
            rows = [
                {
                    "prompt": examples[i // G].prompt,
                    "completion": texts[i],
                    "reward": rewards[i].item(),
                }
                for i in range(min(cfg.train.log_samples, len(texts)))
            ]
            self.logger.samples(step, rows)
        return metrics

    def _count_nonfinite(self, skipped: int) -> None:
        s = self.state
        s.nonfinite_total += skipped
        s.nonfinite_in_a_row = s.nonfinite_in_a_row + 1 if skipped else 0
        limit = self.cfg.train.max_nonfinite_steps
        if s.nonfinite_in_a_row >= limit:
            self._save()
            raise TrainingAbortedError(
                f"{s.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient, so their "
                f"updates were skipped. The last good parameters are saved in "
                f"{self.run_dir / 'checkpoints'}. Try a lower optim.lr, a tighter optim.grad_clip, or "
                f"model.dtype=float32; resume with `seqrl train --resume {self.run_dir}`."
            )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out greedy accuracy and sampled accuracy (avg@k)."""
        k, chunk = self.cfg.train.eval_samples, max(1, 256 // max(1, self.cfg.train.eval_samples))
        greedy_hits, sampled_hits, lengths = [], [], []
        for s in range(0, len(self.eval_examples), chunk):
            part = self.eval_examples[s : s + chunk]
            prompts = [e.prompt for e in part]
            greedy = self.sampler.generate(prompts, group_size=1, greedy=True)
            greedy_hits.append(score_rollout(self.tokenizer, self.task, greedy, part)[1])
            lengths.append(greedy.lengths)
            if k:
                sampled = self.sampler.generate(
                    prompts, group_size=k, temperature=self.cfg.train.eval_temperature
                )
                sampled_hits.append(score_rollout(self.tokenizer, self.task, sampled, part)[1])
        out = {
            "eval/greedy_acc": torch.cat(greedy_hits).mean().item(),
            "eval/greedy_len_mean": torch.cat(lengths).double().mean().item(),
        }
        if k:
            out["eval/sampled_acc"] = torch.cat(sampled_hits).mean().item()
        if self.critic is not None and k:  # critic calibration: prediction vs pass rate of k
            out.update(self._calibration(critic_lib.pass_rates(torch.cat(sampled_hits), k)))
        return reduce_metrics(out, self.dist)

    def _calibration(self, pass_rate) -> dict[str, float]:
        predicted = critic_lib.eval_predictions(self.critic, self.sampler, self.eval_examples)
        if self.logger is not None:
            self._calibration_rows = [
                {"prompt": e.prompt, "predicted": p, "pass_rate": r}
                for e, p, r in zip(
                    self.eval_examples, predicted.tolist(), pass_rate.tolist(), strict=True
                )
            ]
        return critic_lib.calibration_metrics(predicted, pass_rate)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        fresh = self.state.step == 0
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.logger = RunLogger(
            self.run_dir, enabled=self.dist.is_main, tensorboard=cfg.log.tensorboard
        )
        if fresh:
            self._eval_and_log(0)
        start_wall = time.perf_counter() - self.state.wall_time_s
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not (self.show_progress and self.dist.is_main),
        )
        try:
            with progress:
                bar = progress.add_task(
                    f"{cfg.algo.name}", total=cfg.train.steps, completed=self.state.step, info=""
                )
                for step in range(self.state.step + 1, cfg.train.steps + 1):
                    metrics = self.train_step(step)
                    self.state.step = step
                    self.state.wall_time_s = time.perf_counter() - start_wall
                    self.logger.log(step, metrics)
                    self._count_nonfinite(int(metrics["train/nonfinite_skipped"]))
                    if (
                        cfg.train.eval_every
                        and step % cfg.train.eval_every == 0
                        and step != cfg.train.steps
                    ):
                        self._eval_and_log(step)
                    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                        self._save()
                    last_eval = self.state.evals[max(self.state.evals)] if self.state.evals else {}
                    progress.update(
                        bar,
                        advance=1,
                        info=(
                            f"reward {metrics['reward/mean']:.3f}  acc {last_eval.get('eval/greedy_acc', float('nan')):.3f}"
                            f"  {metrics['time/step_s']:.2f}s/step"
                        ),
                    )
            if self.state.step not in self.state.evals:
                self._eval_and_log(self.state.step)
            self._save()
            if self.dist.is_main:
                save_policy(self.model, self.tokenizer, self.run_dir / "final")
                if self.critic is not None:
                    save_critic(
                        self.critic.model, self.tokenizer, self.run_dir / "final" / "critic"
                    )
        finally:
            self.logger.close()
        summary = self.summary()
        if self.dist.is_main:
            self._print_summary(summary)
        return summary

    def _eval_and_log(self, step: int) -> None:
        metrics = self.evaluate()
        self.state.evals[step] = metrics
        if self.logger is not None:
            self.logger.log(step, metrics)
            if self.critic is not None and self.dist.is_main:
                critic_lib.log_calibration(self.run_dir, step, self._calibration_rows)

    def summary(self) -> dict:
        evals = self.state.evals
        first, last = evals[min(evals)], evals[max(evals)]
        return {
            "run_dir": str(self.run_dir),
            "steps": self.state.step,
            "wall_time_s": self.state.wall_time_s,
            "greedy_acc_start": first["eval/greedy_acc"],
            "greedy_acc_end": last["eval/greedy_acc"],
            "sampled_acc_start": first.get("eval/sampled_acc"),
            "sampled_acc_end": last.get("eval/sampled_acc"),
            "nonfinite_skipped": self.state.nonfinite_total,
        }

    def _print_summary(self, s: dict) -> None:
        table = Table(title=f"seqrl run {self.run_dir}")
        for col in ("metric", "start", "end"):
            table.add_column(col)
        table.add_row(
            "held-out greedy accuracy", f"{s['greedy_acc_start']:.3f}", f"{s['greedy_acc_end']:.3f}"
        )
        if s["sampled_acc_start"] is not None:
            table.add_row(
                f"held-out sampled accuracy (avg@{self.cfg.train.eval_samples})",
                f"{s['sampled_acc_start']:.3f}",
                f"{s['sampled_acc_end']:.3f}",
            )
        table.add_row("steps", "0", str(s["steps"]))
        table.add_row("wall time", "", f"{s['wall_time_s']:.0f} s")
        self.console.print(table)
        self.console.print(
            f"metrics: {self.run_dir / 'metrics.jsonl'}   model: {self.run_dir / 'final'}   "
            f"plots: seqrl plot {self.run_dir}"
        )
