"""The training loop: one RL step (:meth:`Trainer.train_step`), evaluation, checkpoints, logging.

``Trainer(cfg).fit()`` runs a whole run; ``Trainer.resume(run_dir).fit()`` continues one. A
trainer holds its run directory from construction to the end of ``fit``
(:mod:`seqrl.train.rundir`), and ``fit`` stops cleanly on SIGINT / SIGTERM
(:mod:`seqrl.train.shutdown`). The maths lives in :mod:`seqrl.core`; the pieces of a step in
:mod:`seqrl.train.sampling` (rollout, rewards), :mod:`seqrl.train.step` and
:mod:`seqrl.train.critic` (advantages, updates), :mod:`seqrl.train.forward` (log-probs) and
:mod:`seqrl.train.optimize` (the optimiser pass); what a run is made of is built by
:mod:`seqrl.train.builders`.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
import warnings
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from torch import Tensor

import seqrl.core as C
from seqrl.config import ConfigError, RunConfig, resume_config
from seqrl.config.schema import default_run_name
from seqrl.evaluation import evaluate_samples, group_means
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
from seqrl.train import sharding
from seqrl.train.dist import DistInfo, init_from_env, reduce_metrics, shard_bounds
from seqrl.train.forward import batch_logprobs
from seqrl.train.metrics import RunLogger, truncate_jsonl
from seqrl.train.rebalance import collect_rollout_rebalanced
from seqrl.train.rollout_worker import RolloutWorker, WorkerSpec
from seqrl.train.rundir import RunDirError, claim_run_dir, describe_os_error
from seqrl.train.sampling import (
    PromptOrder,
    StepRollout,
    collect_step,
    rollout_metrics,
    score_rollout,
    stream_seed,
    with_greedy_baseline,
    with_logprob_noise,
)
from seqrl.train.shutdown import StopRequest, exit_code
from seqrl.train.step import compute_advantages, update_policy

__all__ = [
    "RunDirError",
    "TrainState",
    "Trainer",
    "TrainingAbortedError",
    "TrainingInterruptedError",
    "stream_seed",
]


class TrainingAbortedError(RuntimeError):
    """Raised when training cannot continue (e.g. repeated non-finite updates, a full disk)."""


class TrainingInterruptedError(TrainingAbortedError):
    """Raised by ``fit`` after SIGINT / SIGTERM, once the last step's checkpoint is saved.

    ``exit_code`` is what the process should exit with: 130 (SIGINT) or 143 (SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code(signum)


@dataclass
class TrainState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0  # Σ time/step_s (what train.time_limit_s bounds)
    evals: dict = field(default_factory=dict)  # step → {"eval/greedy_acc": ..., ...}


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        run_dir: Path | None = None,
        console: Console | None = None,
        progress: bool = True,
        overwrite: bool = False,
        _resuming: bool = False,
    ) -> None:
        """Claim the run directory (before anything heavy is built), then build the run.

        The directory is ``run_dir`` or ``output_dir/run_name``; it must not hold another run
        unless ``overwrite`` (which empties it). ``Trainer.resume`` reopens an existing one.
        """
        self.cfg, self.console, self.show_progress = cfg, console or Console(), progress
        self.dist: DistInfo = init_from_env()
        self.device = B.resolve_device(cfg.device, self.dist.local_rank)
        if self.dist.active:
            _check_multi_process(cfg, self.dist)
        self._claim_run_dir(run_dir, overwrite=overwrite, resume=_resuming)
        self._saved_step: int | None = None  # the step of the newest checkpoint this run wrote
        try:
            self._build(cfg)
        except BaseException:  # bad data, a missing model, Ctrl-C: give the directory back
            self.close()
            raise

    def _build(self, cfg: RunConfig) -> None:
        """Models, critic, task data, sampler, optimiser, schedule and prompt order."""
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        loss = cfg.resolved_loss()
        self.mesh = B.build_mesh(cfg, self.device)  # dist.strategy=fsdp: the mesh it shards over
        self.model, self.tokenizer = B.build_policy(cfg, self.device, self.dist)
        self.ref_model = B.build_reference(cfg, self.model, loss, self.device)
        self.critic = B.build_critic(
            cfg, self.model, self.tokenizer, self.device, self.dist, self.mesh
        )
        self.model, self.ref_model = B.add_lora(cfg, self.model, self.ref_model, loss, self.dist)
        self.model, self.ref_model = B.shard_policy(cfg, self.model, self.ref_model, self.mesh)
        self.task, self.train_examples, self.eval_examples = B.build_task_data(
            cfg, self.tokenizer, self.model
        )
        for note in B.data_notes(self.task) if self.dist.is_main else ():
            self.console.print(Text.assemble(("note: ", "yellow"), note))
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
        # rollout.max_staleness = k ≥ 1: a worker process samples ahead (None: sample here)
        self.async_staleness: int | None = cfg.rollout.max_staleness or None
        self._worker: RolloutWorker | None = None
        self._restored_versions: dict = {}  # older policy versions from a checkpoint

    def _claim_run_dir(self, run_dir: Path | None, *, overwrite: bool, resume: bool) -> None:
        """Rank 0 creates (or reopens) and locks the run directory; every rank learns its path
        or the reason it was refused. The lock is dropped at the end of ``fit``, by
        :meth:`close`, or when the trainer is garbage-collected (e.g. its construction failed)."""
        self._run = None
        outcome = None
        if self.dist.is_main:
            path = Path(run_dir) if run_dir else Path(self.cfg.output_dir) / self.cfg.run_name
            fresh_name = None
            if run_dir is None and self.cfg.name is None:  # a default name: draw another one
                fresh_name = lambda: default_run_name(self.cfg.algo.name)  # noqa: E731
            try:
                self._run = claim_run_dir(
                    path, resume=resume, overwrite=overwrite, fresh_name=fresh_name
                )
                outcome = (self._run.path, None)
                weakref.finalize(self, self._run.release)
                ckpt.remove_temporaries(self._run.path / "checkpoints")
            except RunDirError as err:
                outcome = (path, str(err))
        self.run_dir, refused = dist_lib.broadcast_object(outcome, self.dist)
        if refused:
            raise RunDirError(refused)

    def close(self) -> None:
        """Stop the rollout worker, if one runs, and release the run directory (its lock; a
        directory nothing was written to is removed). ``fit`` does this when it returns or fails."""
        if getattr(self, "_worker", None) is not None:
            self._worker.close()
            self._worker = None
        if self._run is not None:
            self._run.release()

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """One RL step: rollout → advantages → π_old and π_ref log-probs → updates → metrics."""
        t0 = time.perf_counter()
        rollout = self.collect(step)  # sample G per prompt, score, shape, filter groups
        batch = rollout.batch
        t_rollout = time.perf_counter() - t0
        old_logprobs, routing = self.old_logprobs(batch)  # [B, T] or None (on-policy)
        ref_logprobs = self.reference_logprobs(batch)  # [B, T] or None (no KL term)
        kl_penalty = self.reward_kl_penalty(batch, old_logprobs, ref_logprobs)  # [B, T] or None
        advantages, critic_metrics = self.advantages(step, rollout, kl_penalty)  # [B] or [B, T]
        lr = self.optimizer.param_groups[0]["lr"]
        update_metrics, skipped = self.update(
            step, batch, advantages, old_logprobs, ref_logprobs, routing
        )
        self.advance_schedule()
        if self._worker is not None:
            self._worker.publish(step)  # version `step` of the weights, for step step + 1 + k
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
        """The step's rollout (``seqrl.train.sampling``), with ReMax's greedy baseline.

        With ``rollout.max_staleness`` = k ≥ 1 the rollout worker sampled it, with the policy
        of step max(0, t − 1 − k) (:mod:`seqrl.train.rollout_worker`). With dynamic sampling
        under ``torchrun`` the kept groups are rebalanced between the processes
        (:mod:`seqrl.train.rebalance`). ``rollout.logprob_noise`` perturbs the sampler's
        log-probs afterwards.
        """
        rollout = self._collect(step)
        std = self.cfg.rollout.logprob_noise
        if std:
            gen = torch.Generator().manual_seed(
                stream_seed(self.cfg.seed, step, -7, self.dist.rank)
            )
            rollout = with_logprob_noise(rollout, std, gen)
        return rollout

    def _collect(self, step: int) -> StepRollout:
        remax = self.cfg.algo.advantage == "remax"
        if self.async_staleness is not None:
            return self._rollout_worker().take(step)
        if not (self.dist.active and self.sampling_settings.dynamic):
            return collect_step(
                self.sampler,
                self.tokenizer,
                self.task,
                self.prompts,
                self.sampling_settings,
                step,
                greedy_baseline_too=remax,
            )
        every = PromptOrder(
            self.train_examples, prompts_per_step=self.prompts.P, seed=self.cfg.seed
        )
        rollout = collect_rollout_rebalanced(
            self.sampler,
            self.tokenizer,
            self.task,
            every.step_examples(step),
            every.side_examples(step),
            self.sampling_settings,
            every.seeds_for(step),
            self.dist,
            self.device,
        )
        if not remax:
            return rollout
        s = self.sampling_settings
        return with_greedy_baseline(rollout, self.sampler, self.tokenizer, self.task, s)

    def _rollout_worker(self) -> RolloutWorker:
        """The rollout worker, started on first use with the versions it needs."""
        if self._worker is None:
            spec = WorkerSpec(
                cfg=self.cfg,
                dist=self.dist,
                device=str(self.device),
                run_dir=str(self.run_dir),
                first_step=self.state.step + 1,
                last_step=self.cfg.train.steps,
                max_staleness=self.async_staleness,
            )
            self._worker = RolloutWorker(spec, self.model, self._restored_versions)
        return self._worker

    def advantages(
        self, step: int, rollout: StepRollout, kl_penalty: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Advantages from the group estimator, or from the critic (which then updates).

        ``kl_penalty`` [B, T]: the KL in the reward (:meth:`reward_kl_penalty`), or None.
        """
        if not dist_lib.any_rank(bool(rollout.examples), self.dist):  # no group kept anywhere
            return rollout.rewards, {}  # [0]
        batch, metrics = rollout.batch, {}
        if kl_penalty is not None:
            metrics["reward/kl_penalty_mean"] = kl_penalty.sum(-1).mean().item()  # Σ_t β·k_t
        if self.critic is None:
            a = self.cfg.algo
            adv = compute_advantages(
                a.advantage,
                rollout.rewards,
                batch.group_size,
                eps=a.adv_eps,
                greedy_rewards=rollout.greedy_rewards,
                kl_penalty=kl_penalty,
                mask=batch.response_mask,
            )
            return adv, metrics
        t0 = time.perf_counter()  # values before the critic's update, then its update
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 500_000)
        adv, critic_metrics = critic_lib.critic_step(
            self.critic, batch, rollout.rewards, gen, rollout.correct, kl_penalty
        )
        return adv, metrics | critic_metrics | {"time/critic_s": time.perf_counter() - t0}

    def reward_kl_penalty(
        self, batch: RolloutBatch, old_logprobs: Tensor | None, ref_logprobs: Tensor | None
    ) -> Tensor | None:
        """β·k(log π_old − log π_ref) [B, T] for ``reward.kl_coef`` > 0, else None.

        π_old is the step's old log-probs, or, for a single on-policy update (which needs
        none), a forward of the policy before its update.
        """
        rw = self.cfg.reward
        if not rw.kl_coef or not batch.response_ids.shape[0]:
            return None
        if old_logprobs is None:
            old_logprobs = self._logprobs(self.model, batch)
        return C.reward_kl_penalty(
            old_logprobs,
            ref_logprobs,
            batch.response_mask,
            kl_coef=rw.kl_coef,
            kl_estimator=rw.kl_estimator,
        )

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
        if not dist_lib.any_rank(bool(batch.response_ids.shape[0]), self.dist) or warming_up:
            return {}, 0  # (a process may hold no row while others do: it still takes part)
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
        """Means over ranks; rollout statistics recomputed over every rank's responses.

        (With dynamic sampling they already are: every process saw every generation batch.)
        """
        if self.dist.active and not self.sampling_settings.dynamic:
            gathered = [
                dist_lib.gather_cat(t, self.dist)
                for t in (rollout.correct, rollout.batch.lengths, rollout.batch.truncated)
            ]
            terms = dist_lib.gather_cat(rollout.terms.T, self.dist).T  # [n_terms, all rows]
            scores = dist_lib.gather_cat(rollout.scores, self.dist)
            metrics |= rollout_metrics(*gathered, self.sampling_settings, terms, scores)
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

        greedy_scores = gathered(greedy_hits)  # [eval examples], in their order
        out = {
            "eval/greedy_acc": greedy_scores.mean().item(),
            "eval/greedy_len_mean": gathered(lengths).mean().item(),
        }
        if self.cfg.task.group_by:  # eval/greedy_acc/<value of the column>
            groups = group_means(greedy_scores.tolist(), self.eval_examples, self.cfg.task.group_by)
            out |= {f"eval/greedy_acc/{name}": acc for name, acc in groups.items()}
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
            with self._writing("the metrics log"):
                self.logger.log(step, metrics)
                if self.critic is not None and self.dist.is_main:
                    if self.cfg.train.eval_samples:  # calibration needs the k samples' pass rates
                        critic_lib.log_calibration(self.run_dir, step, self._calibration_rows)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train from ``state.step`` to ``train.steps``: evaluate, checkpoint, save ``final/``.

        On SIGINT / SIGTERM the step in progress finishes (with its evaluation, if one is due),
        a checkpoint of it is saved and :class:`TrainingInterruptedError` is raised; a second
        signal stops at once. A failed write (a full disk, a read-only directory) raises
        :class:`TrainingAbortedError` naming the file and the last intact checkpoint. The run
        directory's lock is released when ``fit`` returns or raises.
        """
        cfg = self.cfg
        fresh = self.state.step == 0 and not self.state.evals
        try:
            if self.dist.is_main and fresh:
                with self._writing("the run config"):
                    (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            with self._writing("the TensorBoard log"):
                self.logger = RunLogger(
                    self.run_dir,
                    enabled=self.dist.is_main,
                    tensorboard=cfg.log.tensorboard,
                    trackers=B.build_trackers(cfg, self.run_dir, self.dist),  # wandb, MLflow
                )
            if self.async_staleness is not None and self.state.step < cfg.train.steps:
                self._rollout_worker()  # starts while the first evaluation runs
            with StopRequest(self._on_stop_signal, repeats_exit=not self.dist.active) as stop:
                if fresh:
                    self._eval_and_log(0)
                start_wall = time.perf_counter() - self.state.wall_time_s
                with self._progress() as (progress, bar):
                    for step in range(self.state.step + 1, cfg.train.steps + 1):
                        self._stop_if_asked(stop)
                        if self._out_of_time():
                            break
                        metrics = self._run_step(step, start_wall)
                        progress.update(bar, advance=1, info=self._progress_info(metrics))
                self._stop_if_asked(stop)
                if self.state.step not in self.state.evals:
                    self._eval_and_log(self.state.step)
                self._save()
                self._save_final()
        finally:
            if self.logger is not None:
                self.logger.close()
            self.close()
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
        self.state.train_time_s += metrics["time/step_s"]
        with self._writing("the metrics log"):
            self.logger.log(step, metrics)
        self._count_nonfinite(int(metrics["train/nonfinite_skipped"]))
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            self._eval_and_log(step)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            self._save()
        return metrics

    def _out_of_time(self) -> bool:
        limit = self.cfg.train.time_limit_s
        return limit is not None and self.state.train_time_s >= limit

    # ------------------------------------------------------------------ stopping early
    def _on_stop_signal(self, signum: int) -> None:
        """Runs inside the signal handler: say what happens next (rank 0; a raw write)."""
        if not self.dist.is_main:
            return
        name = signal.Signals(signum).name
        key = "Ctrl-C" if signum == signal.SIGINT else name
        again = "" if self.dist.active else f"; {key} again stops at once"
        stopping = "stopping at the end of this step, with a checkpoint"
        os.write(2, f"\n{name} received: {stopping}{again}\n".encode())

    def _stop_if_asked(self, stop: StopRequest) -> None:
        """At a step boundary: if any rank caught a signal, save this step and stop (all ranks)."""
        signum = stop.signum or 0
        if self.dist.active:  # ranks may catch it a step apart: all stop at the same boundary
            signum = max(dist_lib.gather_list([signum], self.dist))
        if not signum:
            return
        if self._saved_step != self.state.step:
            self._save()
        dist_lib.barrier(self.dist)  # the checkpoint is on disk before any rank exits
        where = self.run_dir / "checkpoints" / f"step-{self.state.step}"
        launcher = "torchrun ... -m seqrl" if self.dist.active else "seqrl"
        raise TrainingInterruptedError(
            f"stopped by {signal.Signals(signum).name} after step {self.state.step} of "
            f"{self.cfg.train.steps}; saved {where}\n"
            f"resume with: {launcher} train --resume {self.run_dir}",
            signum,
        )

    @contextmanager
    def _writing(self, what: str):
        """Turn a failed write (OSError) into a TrainingAbortedError naming the last checkpoint."""
        try:
            yield
        except OSError as err:
            latest = ckpt.complete_checkpoints(self.run_dir / "checkpoints")
            if latest:
                intact = (
                    f"The last complete checkpoint, {latest[-1]}, is intact: once the cause is "
                    f"fixed, continue with `seqrl train --resume {self.run_dir}`."
                )
            else:
                intact = (
                    "No checkpoint had been written yet, so there is nothing to resume: once "
                    "the cause is fixed, start the run again (--overwrite reuses its name)."
                )
            raise TrainingAbortedError(
                f"could not write {what}: {describe_os_error(err)}\n{intact}"
            ) from err

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
    def resume(cls, run_dir: Path, overrides: Sequence[str] = (), **kwargs) -> Trainer:
        """Continue the run in ``run_dir`` from its newest complete checkpoint.

        ``overrides`` may change what :data:`seqrl.config.RESUME_SAFE_KEYS` lists (e.g.
        ``train.steps=400`` to extend a finished run); config.yaml is updated with them.
        """
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        cfg = resume_config(run_dir, overrides)
        trainer = cls(cfg, run_dir=run_dir, _resuming=True, **kwargs)
        latest = ckpt.load_latest(run_dir / "checkpoints")
        if latest is None:
            trainer.close()
            raise FileNotFoundError(
                f"{run_dir}/checkpoints has no complete checkpoint to resume from; "
                f"start the run again with `seqrl train {config_path}`"
            )
        try:
            trainer._restore(latest)
            if cfg.train.steps < trainer.state.step:
                raise ConfigError(
                    f"train.steps={cfg.train.steps} is below the step the run has reached "
                    f"({trainer.state.step}); a resume can only go on"
                )
        except BaseException:
            trainer.close()
            raise
        if overrides and trainer.dist.is_main:
            config_path.write_text(cfg.to_yaml())
        return trainer

    def _restore(self, c: ckpt.Checkpoint) -> None:
        if c.sharded != (self.mesh is not None):
            saved = "fsdp" if c.sharded else "replicate"
            raise ValueError(
                f"checkpoint {c.path} was written with dist.strategy={saved}, but this run uses "
                f"dist.strategy={self.cfg.dist.strategy}; resume with the strategy it was saved with"
            )
        if c.sharded:  # every process reads its slice, whatever the number of processes
            ckpt.load_sharded_state(c.path, self._sharded_modules())
            if self.critic is not None:
                self.critic.scheduler.load_state_dict(c.state["critic"]["scheduler"])
        else:
            c.load_weights(self.model)
            self.optimizer.load_state_dict(c.state["optimizer"])
            if self.critic is not None:
                self.critic.load_state_dict(c.state["critic"])
        self.scheduler.load_state_dict(c.state["scheduler"])
        self.state = TrainState(**c.state["trainer"])
        self._restored_versions = c.state.get("rollout_versions", {})
        ckpt.set_rng_state(c.state["rng"])
        self.sampler.sync_weights()
        self._saved_step = c.step
        if self.dist.is_main:  # rank 0 owns the logs
            for name in ("metrics.jsonl", "samples.jsonl", critic_lib.CALIBRATION_FILE):
                with self._writing(name):
                    if truncate_jsonl(self.run_dir / name, self.state.step):
                        self.console.print(
                            f"dropped the torn last line of {name} (the run was stopped while "
                            f"writing it)"
                        )
        dist_lib.barrier(self.dist)
        self.console.print(f"resumed {self.run_dir} from {c.path.name}")

    def _save(self) -> None:
        if self.mesh is not None:
            self._save_sharded()
            return
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
        if self.async_staleness is not None:  # the versions that sample the next k steps
            state["rollout_versions"] = (
                self._worker.saved_versions(self.state.step)
                if self._worker is not None
                else self._restored_versions
            )
        with self._writing(f"checkpoint step-{self.state.step}"):
            ckpt.save_checkpoint(
                self.run_dir / "checkpoints",
                self.state.step,
                self.model,
                state,
                keep=self.cfg.train.keep_checkpoints,
            )
        self._saved_step = self.state.step

    def _sharded_modules(self) -> dict:
        """The FSDP-sharded (model, optimizer) pairs a sharded checkpoint holds."""
        out = {"policy": (self.model, self.optimizer)}
        if self.critic is not None:
            out["critic"] = (self.critic.model, self.critic.optimizer)
        return out

    def _save_sharded(self) -> None:
        """``dist.strategy: fsdp``: every process writes its shards (torch.distributed.checkpoint)."""
        state = {
            "scheduler": self.scheduler.state_dict(),
            "trainer": vars(self.state).copy(),
            "rng": ckpt.rng_state(),
        }
        if self.critic is not None:
            state["critic"] = {"scheduler": self.critic.scheduler.state_dict()}
        ckpt.save_sharded_checkpoint(
            self.run_dir / "checkpoints",
            self.state.step,
            self._sharded_modules(),
            state,
            rank=self.dist.rank,
            keep=self.cfg.train.keep_checkpoints,
        )

    def _save_final(self) -> None:
        """``final/``: the policy (LoRA merged) and the critic in Hugging Face format.

        Under FSDP the full weights are gathered to rank 0 one tensor at a time.
        """
        policy, critic = self.model, None if self.critic is None else self.critic.model
        if self.mesh is not None:
            policy = sharding.gather_full_model(policy)
            critic = critic if critic is None else sharding.gather_full_model(critic)
        if self.dist.is_main:
            final = self.run_dir / "final"
            with self._writing("the final model"), ckpt.write_errors_as_oserror(final):
                save_policy(policy, self.tokenizer, final)
                if critic is not None:
                    save_critic(merged(critic), self.tokenizer, final / "critic")
        dist_lib.barrier(self.dist)  # the final files are on disk before any rank returns


def _check_multi_process(cfg: RunConfig, dist: DistInfo) -> None:
    """What a ``torchrun`` job cannot do; fails before anything is built."""
    if not cfg.rollout.dynamic_sampling:  # (dynamic sampling rebalances the kept groups)
        shard_bounds(cfg.rollout.prompts_per_step, dist)  # P must split evenly over the ranks
