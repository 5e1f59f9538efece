"""The training loop: one RL step (:meth:`Trainer.train_step`), evaluation, checkpoints, logging.

``Trainer(cfg).fit()`` runs a whole run; ``Trainer.resume(run_dir).fit()`` continues one. The
maths lives in :mod:`seqrl.core`; the pieces of a step in :mod:`seqrl.train.sampling` (rollout,
rewards), :mod:`seqrl.train.step` and :mod:`seqrl.train.critic` (advantages, updates),
:mod:`seqrl.train.forward` (log-probs) and :mod:`seqrl.train.optimize` (the optimiser pass);
what a run is made of is built by :mod:`seqrl.train.builders`.
"""

from __future__ import annotations

import random
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor

from seqrl.config import RunConfig, load_config
from seqrl.evaluation import evaluate_samples
from seqrl.models import save_policy
from seqrl.models.critic import save_critic
from seqrl.models.load import checkpointing_active
from seqrl.models.lora import merged
from seqrl.rollout import RolloutBatch
from seqrl.tasks.rewards import RewardFunctionError
from seqrl.train import builders as B
from seqrl.train import checkpoint as ckpt
from seqrl.train import critic as critic_lib
from seqrl.train import dist as dist_lib
from seqrl.train.dist import DistInfo, init_from_env, reduce_metrics, shard_bounds
from seqrl.train.forward import batch_logprobs
from seqrl.train.metrics import RunLogger, truncate_jsonl
from seqrl.train.sampling import (
    PromptOrder,
    StepRollout,
    collect_rollout,
    greedy_baseline,
    rollout_metrics,
    score_rollout,
    stream_seed,
)
from seqrl.train.step import compute_advantages, update_policy

__all__ = ["TrainState", "Trainer", "TrainingAbortedError", "stream_seed"]


class TrainingAbortedError(RuntimeError):
    """Raised when training cannot continue (e.g. repeated non-finite updates)."""


@dataclass
class TrainState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    wall_time_s: float = 0.0
    evals: dict = field(default_factory=dict)  # step → {"eval/greedy_acc": ..., ...}


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        run_dir: Path | None = None,
        console: Console | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg, self.console, self.show_progress = cfg, console or Console(), progress
        self.dist: DistInfo = init_from_env()
        run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.run_name
        self.run_dir = dist_lib.broadcast_object(run_dir, self.dist)  # rank 0's timestamp
        self.device = B.resolve_device(cfg.device, self.dist.local_rank)
        if self.dist.active:
            _check_multi_process(cfg, self.dist)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        loss = cfg.resolved_loss()
        self.model, self.tokenizer = B.build_policy(cfg, self.device, self.dist)
        self.ref_model = B.build_reference(cfg, self.model, loss, self.device)
        self.critic = B.build_critic(cfg, self.model, self.tokenizer, self.device, self.dist)
        self.model, self.ref_model = B.add_lora(cfg, self.model, self.ref_model, loss, self.dist)
        self.task, self.train_examples, self.eval_examples = B.build_task_data(cfg, self.tokenizer)
        self.max_new_tokens = cfg.rollout.max_new_tokens or self.task.max_new_tokens
        self.sampler = B.build_sampler(
            cfg,
            self.model,
            self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            device=self.device,
            run_dir=self.run_dir,
            dist=self.dist,
        )
        o = cfg.optim
        self.optimizer = B.build_optimizer(self.model, o)
        self.scheduler = B.build_scheduler(
            self.optimizer, o.schedule, o.warmup_steps, cfg.train.steps, o.min_lr_ratio
        )
        self.update_settings = B.update_settings(cfg)
        self.sampling_settings = B.sampling_settings(cfg, self.task, self.max_new_tokens)
        self.routing = B.build_routing(cfg, self.model)  # MoE: routing at θ_old, maybe replayed
        self.prompts = PromptOrder(
            self.train_examples,
            prompts_per_step=cfg.rollout.prompts_per_step,
            seed=cfg.seed,
            dist=self.dist,
        )
        self.state = TrainState()
        self.logger: RunLogger | None = None

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """One RL step: rollout → advantages → π_old and π_ref log-probs → updates → metrics."""
        t0 = time.perf_counter()
        rollout = self.collect(step)  # sample G per prompt, score, shape, filter groups
        batch = rollout.batch
        t_rollout = time.perf_counter() - t0
        advantages, critic_metrics = self.advantages(step, rollout)  # [B] or [B, T]
        old_logprobs, routing = self.old_logprobs(batch)  # [B, T] or None (on-policy)
        ref_logprobs = self.reference_logprobs(batch)  # [B, T] or None (no KL term)
        lr = self.optimizer.param_groups[0]["lr"]
        update_metrics, skipped = self.update(
            step, batch, advantages, old_logprobs, ref_logprobs, routing
        )
        self.advance_schedule()
        t_step = time.perf_counter() - t0

        metrics = {
            **rollout.metrics,  # reward/*, train/accuracy, response_len/*, sampling/*
            "train/lr": lr,
            "train/nonfinite_skipped": float(skipped),
            **update_metrics,
            **critic_metrics,
            "time/rollout_s": t_rollout,
            "time/train_s": t_step - t_rollout,
            "time/step_s": t_step,
            "throughput/tokens_per_s": batch.lengths.double().sum().item() / t_step,
        }
        if rollout.greedy_rewards is not None:
            metrics["reward/greedy_mean"] = rollout.greedy_rewards.mean().item()
        metrics = self.reduce_step_metrics(metrics, rollout)
        self.log_samples(step, rollout)
        return metrics

    def collect(self, step: int) -> StepRollout:
        """The step's rollout (``seqrl.train.sampling``), with ReMax's greedy baseline."""
        rollout = collect_rollout(
            self.sampler,
            self.tokenizer,
            self.task,
            self.prompts.step_examples(step),
            self.prompts.side_examples(step),
            self.sampling_settings,
            seeds_for=self.prompts.seeds_for(step),
        )
        if self.cfg.algo.advantage == "remax" and rollout.examples:
            greedy = greedy_baseline(
                self.sampler, self.tokenizer, self.task, rollout.examples, self.sampling_settings
            )
            rollout = replace(rollout, greedy_rewards=greedy)
        return rollout

    def advantages(self, step: int, rollout: StepRollout) -> tuple[Tensor, dict[str, float]]:
        """Advantages from the group estimator, or from the critic (which then updates)."""
        if not rollout.examples:  # dynamic sampling kept no group: nothing to learn from
            return rollout.rewards, {}  # [0]
        if self.critic is None:
            a = self.cfg.algo
            group_size = rollout.batch.group_size
            greedy = rollout.greedy_rewards
            adv = compute_advantages(
                a.advantage, rollout.rewards, group_size, eps=a.adv_eps, greedy_rewards=greedy
            )
            return adv, {}
        t0 = time.perf_counter()  # values before the critic's update, then its update
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 500_000)
        adv, metrics = critic_lib.critic_step(self.critic, rollout.batch, rollout.rewards, gen)
        return adv, metrics | {"time/critic_s": time.perf_counter() - t0}

    def old_logprobs(self, batch: RolloutBatch) -> tuple[Tensor | None, object]:
        """(π_old log-probs [B, T], the MoE routing recorded with them).

        The sampler's μ (``rollout.old_logprobs_source=sampler``); None for a single on-policy
        update (π_old is then the update's own forward, detached); else recomputed at θ_old.
        """
        a = self.cfg.algo
        if self.cfg.rollout.old_logprobs_source == "sampler":
            return batch.sampler_logprobs, None
        if a.num_minibatches * a.ppo_epochs == 1:
            return None, None
        return self._logprobs(self.model, batch, routing=self.routing), self.routing

    def reference_logprobs(self, batch: RolloutBatch) -> Tensor | None:
        """π_ref log-probs [B, T] for the KL term; None without one."""
        return None if self.ref_model is None else self._logprobs(self.ref_model, batch)

    def _logprobs(self, model, batch: RolloutBatch, routing=None) -> Tensor:
        return batch_logprobs(
            model,
            batch,
            temperature=self.cfg.rollout.temperature,
            micro_batch_size=self.cfg.algo.micro_batch_size,
            routing=routing,
            shared_prefix=self.cfg.algo.shared_prefix,
            packing=self.cfg.algo.packing,
            max_tokens=self.cfg.algo.max_tokens_per_micro_batch,
        )

    def update(
        self,
        step: int,
        batch: RolloutBatch,
        advantages: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        routing,
    ) -> tuple[dict[str, float], int]:
        """The policy's optimiser steps on this rollout, then the sampler gets the new weights.

        No update when no group was kept or while the critic warms up (``critic.warmup_steps``).
        """
        warming_up = self.critic is not None and step <= self.cfg.critic.warmup_steps
        if not batch.response_ids.shape[0] or warming_up:
            return {}, 0
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        with checkpointing_active(self.model):
            out = update_policy(
                self.model,
                self.optimizer,
                batch,
                advantages,
                old_logprobs,
                ref_logprobs,
                self.update_settings,
                generator,
                self.dist,
                routing=routing,
            )
        self.sampler.sync_weights()  # the next rollout samples from the updated policy
        return out

    def advance_schedule(self) -> None:
        """One LR-schedule step per RL step, also when every update was skipped."""
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=re.escape("Detected call of `lr_scheduler.step()`")
            )
            self.scheduler.step()

    def reduce_step_metrics(self, metrics: dict, rollout: StepRollout) -> dict[str, float]:
        """Means over ranks; rollout statistics recomputed over every rank's responses."""
        if self.dist.active:
            gathered = [
                dist_lib.gather_cat(t, self.dist)
                for t in (rollout.correct, rollout.batch.lengths, rollout.batch.truncated)
            ]
            terms = dist_lib.gather_cat(rollout.terms.T, self.dist).T  # [n_terms, all rows]
            metrics |= rollout_metrics(*gathered, self.sampling_settings, terms)
        metrics = reduce_metrics(metrics, self.dist)
        metrics["throughput/tokens_per_s"] *= self.dist.world_size  # all ranks' tokens
        return metrics

    def log_samples(self, step: int, rollout: StepRollout) -> None:
        if self.logger is None:
            return
        G = rollout.batch.group_size
        rows = [
            {
                "prompt": rollout.examples[i // G].prompt,
                "completion": rollout.texts[i],
                "reward": rollout.rewards[i].item(),
            }
            for i in range(min(self.cfg.train.log_samples, len(rollout.texts)))
        ]
        self.logger.samples(step, rows)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out greedy accuracy, and over k samples per problem avg@k, pass@k and cons@k.

        The k-sample statistics are :func:`seqrl.evaluation.evaluate_samples`, the code behind
        ``seqrl eval``; ``eval/sampled_acc`` is avg@k. Each eval example draws its k samples
        from its own stream (the same at every eval), and under ``torchrun`` each rank
        evaluates a contiguous share of the examples.
        """
        k, chunk = self.cfg.train.eval_samples, max(1, 256 // max(1, self.cfg.train.eval_samples))
        lo, hi = dist_lib.uneven_bounds(len(self.eval_examples), self.dist)
        greedy_hits, lengths, records = [], [], []
        for s in range(lo, hi, chunk):
            part = self.eval_examples[s : min(s + chunk, hi)]
            greedy = self.sampler.generate([e.prompt for e in part], group_size=1, greedy=True)
            greedy_hits.append(score_rollout(self.tokenizer, self.task, greedy, part)[1])
            lengths.append(greedy.lengths.cpu())
            if k:
                records += self._sampled_records(part, first=s, k=k)

        def gathered(parts: list) -> torch.Tensor:
            local = torch.cat(parts) if parts else torch.zeros(0)
            return dist_lib.gather_cat(local.double(), self.dist)

        out = {
            "eval/greedy_acc": gathered(greedy_hits).mean().item(),
            "eval/greedy_len_mean": gathered(lengths).mean().item(),
        }
        if k:
            records = dist_lib.gather_list(records, self.dist)  # in eval-example order
            for key in (f"avg@{k}", f"pass@{k}", f"cons@{k}"):
                values = [r[key] for r in records if key in r]
                if values:
                    name = "eval/sampled_acc" if key.startswith("avg@") else f"eval/{key}"
                    out[name] = sum(values) / len(values)
            if self.critic is not None:  # critic calibration: prediction vs pass rate of k
                hits = torch.tensor([score > 0 for r in records for score in r["scores"]])
                out.update(self._calibration(critic_lib.pass_rates(hits, k)))
        return out

    def _sampled_records(self, part: list, *, first: int, k: int) -> list[dict]:
        """k samples of each example of ``part`` (eval examples first …), scored per item."""
        sampled = self.sampler.generate(
            [e.prompt for e in part],
            group_size=k,
            temperature=self.cfg.train.eval_temperature,
            seeds=[stream_seed(self.cfg.seed, -1, i) for i in range(first, first + len(part))],
        )
        texts = self.tokenizer.batch_decode(sampled.response_ids, skip_special_tokens=True)
        per_item = [texts[i * k : (i + 1) * k] for i in range(len(part))]
        return [
            {key: v for key, v in rec.items() if "@" in key or key == "scores"}
            for rec in evaluate_samples(self.task, part, per_item, ks=[k], ci=False)[0]
        ]

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

    def _eval_and_log(self, step: int) -> None:
        metrics = self.evaluate()
        self.state.evals[step] = metrics
        if self.logger is not None:
            self.logger.log(step, metrics)
            if self.critic is not None and self.dist.is_main:
                critic_lib.log_calibration(self.run_dir, step, self._calibration_rows)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train from ``state.step`` to ``train.steps``: evaluate, checkpoint, save ``final/``."""
        cfg = self.cfg
        fresh = self.state.step == 0
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.logger = RunLogger(
            self.run_dir, enabled=self.dist.is_main, tensorboard=cfg.log.tensorboard
        )
        try:
            if fresh:
                self._eval_and_log(0)
            start_wall = time.perf_counter() - self.state.wall_time_s
            with self._progress() as (progress, bar):
                for step in range(self.state.step + 1, cfg.train.steps + 1):
                    metrics = self._run_step(step, start_wall)
                    progress.update(bar, advance=1, info=self._progress_info(metrics))
            if self.state.step not in self.state.evals:
                self._eval_and_log(self.state.step)
            self._save()
            self._save_final()
        finally:
            self.logger.close()
        summary = self.summary()
        if self.dist.is_main:
            self._print_summary(summary)
        return summary

    def _run_step(self, step: int, start_wall: float) -> dict[str, float]:
        """``train_step``, then the bookkeeping: log, non-finite count, eval, checkpoint."""
        cfg = self.cfg
        try:
            metrics = self.train_step(step)
        except RewardFunctionError as err:  # keep every finished step, then stop
            self._save()
            raise TrainingAbortedError(
                f"{err}\nThe run's state after step {self.state.step} is saved in "
                f"{self.run_dir / 'checkpoints'}; fix the function and resume with "
                f"`seqrl train --resume {self.run_dir}`."
            ) from err
        self.state.step = step
        self.state.wall_time_s = time.perf_counter() - start_wall
        self.logger.log(step, metrics)
        self._count_nonfinite(int(metrics["train/nonfinite_skipped"]))
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            self._eval_and_log(step)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            self._save()
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

    # ------------------------------------------------------------------ progress and summary
    @contextmanager
    def _progress(self):
        """A rich progress bar over the run's steps (rank 0 only); yields (progress, task id)."""
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not (self.show_progress and self.dist.is_main),
        )
        with progress:
            total, done = self.cfg.train.steps, self.state.step
            yield (
                progress,
                progress.add_task(self.cfg.algo.name, total=total, completed=done, info=""),
            )

    def _progress_info(self, metrics: dict) -> str:
        evals = self.state.evals
        acc = evals[max(evals)].get("eval/greedy_acc", float("nan")) if evals else float("nan")
        return f"reward {metrics['reward/mean']:.3f}  acc {acc:.3f}  {metrics['time/step_s']:.2f}s/step"

    def summary(self) -> dict:
        evals = self.state.evals
        first, last = evals[min(evals)], evals[max(evals)]
        k = self.cfg.train.eval_samples
        return {
            "run_dir": str(self.run_dir),
            "steps": self.state.step,
            "wall_time_s": self.state.wall_time_s,
            "greedy_acc_start": first["eval/greedy_acc"],
            "greedy_acc_end": last["eval/greedy_acc"],
            "sampled_acc_start": first.get("eval/sampled_acc"),
            "sampled_acc_end": last.get("eval/sampled_acc"),
            "pass_at_k_start": first.get(f"eval/pass@{k}"),
            "pass_at_k_end": last.get(f"eval/pass@{k}"),
            "nonfinite_skipped": self.state.nonfinite_total,
        }

    def _print_summary(self, s: dict) -> None:
        k = self.cfg.train.eval_samples
        table = Table(title=f"seqrl run {self.run_dir}")
        for col in ("metric", "start", "end"):
            table.add_column(col)
        rows = [
            ("held-out greedy accuracy", "greedy_acc"),
            (f"held-out sampled accuracy (avg@{k})", "sampled_acc"),
            (f"held-out pass@{k}", "pass_at_k"),
        ]
        for label, key in rows:
            if s[f"{key}_start"] is not None:
                table.add_row(label, f"{s[f'{key}_start']:.3f}", f"{s[f'{key}_end']:.3f}")
        table.add_row("steps", "0", str(s["steps"]))
        table.add_row("wall time", "", f"{s['wall_time_s']:.0f} s")
        self.console.print(table)
        self.console.print(
            f"metrics: {self.run_dir / 'metrics.jsonl'}   model: {self.run_dir / 'final'}   "
            f"plots: seqrl plot {self.run_dir}"
        )

    # ------------------------------------------------------------------ checkpoints and resume
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
        self.sampler.sync_weights()
        if self.dist.is_main:  # rank 0 owns the logs
            for name in ("metrics.jsonl", "samples.jsonl", critic_lib.CALIBRATION_FILE):
                truncate_jsonl(self.run_dir / name, self.state.step)
        dist_lib.barrier(self.dist)
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

    def _save_final(self) -> None:
        """``final/``: the policy (LoRA merged) and the critic in Hugging Face format."""
        if self.dist.is_main:
            save_policy(self.model, self.tokenizer, self.run_dir / "final")
            if self.critic is not None:
                critic_dir = self.run_dir / "final" / "critic"
                save_critic(merged(self.critic.model), self.tokenizer, critic_dir)
        dist_lib.barrier(self.dist)  # the final files are on disk before any rank returns


def _check_multi_process(cfg: RunConfig, dist: DistInfo) -> None:
    """What a ``torchrun`` job cannot do (yet); fails before anything is built."""
    shard_bounds(cfg.rollout.prompts_per_step, dist)  # P must split evenly over the ranks
    if cfg.rollout.dynamic_sampling:
        raise ValueError(
            "rollout.dynamic_sampling runs in one process only for now (the kept groups "
            "would have to be rebalanced between processes); set "
            "rollout.dynamic_sampling=false for multi-process runs, or run one process"
        )
