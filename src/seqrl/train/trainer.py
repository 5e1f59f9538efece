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
from seqrl.evaluation import evaluate_samples
from seqrl.models import chat_prompts, load_policy, save_policy
from seqrl.models.critic import save_critic
from seqrl.models.load import checkpointing_active, enable_gradient_checkpointing
from seqrl.models.lora import AdaptersOff, apply_lora, merged
from seqrl.models.moe import is_moe
from seqrl.rollout import HFSampler
from seqrl.rollout.fast import FastSampler
from seqrl.tasks.rewards import RewardFunctionError, resolve_terms
from seqrl.train import checkpoint as ckpt
from seqrl.train import critic as critic_lib
from seqrl.train import dist as dist_lib
from seqrl.train.dist import DistInfo, init_from_env, reduce_metrics, shard, shard_bounds
from seqrl.train.metrics import RunLogger, truncate_jsonl
from seqrl.train.routing import RolloutRouting
from seqrl.train.sampling import (
    SamplingSettings,
    collect_rollout,
    extra_terms,
    rollout_metrics,
    shaped_rewards,
    side_stream,
)
from seqrl.train.step import (
    UpdateSettings,
    batch_logprobs,
    compute_advantages,
    score_rollout,
    update_policy,
)


def _mismatch_settings(cfg: RunConfig) -> dict:
    """UpdateSettings fields of the train–inference mismatch correction (``algo.mismatch``)."""
    m = cfg.algo.mismatch
    return {
        "mismatch_correction": m.correction,
        "mismatch_level": m.level,
        "mismatch_cap": m.cap,
    }


class TrainingAbortedError(RuntimeError):
    """Raised when training cannot continue (e.g. repeated non-finite updates)."""


@dataclass
class TrainState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    wall_time_s: float = 0.0
    evals: dict = field(default_factory=dict)  # step → {"eval/greedy_acc": ..., ...}


def _device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def stream_seed(*parts: int) -> int:
    """A sampling-stream seed from integers (run seed, step, prompt slot, ...): stable everywhere."""
    out = 0
    for part in parts:
        out = (out * 1_000_003 + part + 7_919) % (2**61 - 1)
    return out


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
        self.run_dir = dist_lib.broadcast_object(self.run_dir, self.dist)  # rank 0's timestamp
        self.device = _device(cfg.device, self.dist.local_rank)
        if self.dist.active:
            shard_bounds(cfg.rollout.prompts_per_step, self.dist)  # fail early if P ∤ world size
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.model, self.tokenizer = load_policy(cfg.model.policy)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self.model.to(self.device, dtype)
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        dist_lib.broadcast_module(self.model, self.dist)  # replicas start identical
        self.loss_cfg = cfg.resolved_loss()
        lora = cfg.model.lora
        self.ref_model = None
        if self.loss_cfg.kl_coef and (cfg.model.reference or not lora.r):
            ref_source = cfg.model.reference
            self.ref_model = (
                load_policy(ref_source)[0].to(self.device, dtype)
                if ref_source
                else copy.deepcopy(self.model)
            )
            self.ref_model.eval().requires_grad_(False)
        # critic (SPPO / PPO-GAE): its own model, optimizer and schedule; None without one
        self.critic = critic_lib.critic_from_config(
            cfg, self.model, self.tokenizer, self.device, self.dist
        )
        if self.critic is not None:
            dist_lib.broadcast_module(self.critic.model, self.dist)
        if lora.r:  # adapters on the policy; with KL and no reference given, the base is π_ref
            self.model = apply_lora(
                self.model,
                r=lora.r,
                alpha=lora.alpha,
                target_modules=lora.target_modules,
            )
            if self.loss_cfg.kl_coef and self.ref_model is None:
                self.ref_model = AdaptersOff(self.model)
            dist_lib.broadcast_module(self.model, self.dist)  # the same random adapters everywhere

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
        self.sampler = self._build_sampler()

        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],  # LoRA: the adapters
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
            **_mismatch_settings(cfg),
            shared_prefix=a.shared_prefix,
        )
        # MoE policy: each rollout's routing at θ_old is recorded (moe/* metrics), maybe replayed
        self.routing = None
        if cfg.moe.routing_replay or is_moe(self.model):
            self.routing = RolloutRouting(self.model, replay=cfg.moe.routing_replay)
            if cfg.algo.shared_prefix:
                raise ValueError(
                    "algo.shared_prefix cannot record or replay an MoE policy's routing; "
                    "set algo.shared_prefix=false"
                )
        r = cfg.rollout
        if r.dynamic_sampling and self.dist.world_size > 1:
            raise ValueError(
                "rollout.dynamic_sampling runs in one process only for now (the kept groups "
                "would have to be rebalanced between processes); set "
                "rollout.dynamic_sampling=false for multi-process runs, or run one process"
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
            reward_terms=resolve_terms([(t.fn, t.weight) for t in cfg.reward.terms], self.task),
        )
        self.state = TrainState()
        self.logger: RunLogger | None = None
        self._order, self._order_epoch = None, None  # cached shuffle of the current data epoch

    def _build_sampler(self):
        """The ``rollout.engine``: HFSampler or FastSampler (any device), or colocated vLLM."""
        r = self.cfg.rollout
        common = dict(max_new_tokens=self.max_new_tokens, temperature=r.temperature, top_p=r.top_p)
        if r.engine in ("hf", "fast"):
            sampler_cls = FastSampler if r.engine == "fast" else HFSampler
            return sampler_cls(self.model, self.tokenizer, **common)
        from seqrl.rollout.vllm import VLLMSampler

        if self.device.type != "cuda":
            raise ValueError(
                f"rollout.engine=vllm needs a CUDA device, but the run is on {self.device}; "
                "use rollout.engine=hf"
            )
        v = r.vllm
        work_dir = self.run_dir / f".vllm-rank{self.dist.rank}"
        return VLLMSampler(
            self.model,
            self.tokenizer,
            work_dir=work_dir,
            gpu_memory_utilization=v.gpu_memory_utilization,
            max_model_len=v.max_model_len,
            enforce_eager=v.enforce_eager,
            dtype=v.dtype,
            seed=self.cfg.seed,
            world_size=self.dist.world_size,
            **common,
        )

    def _sync_sampler(self) -> None:
        """Push the policy's weights to a separate inference engine (no-op for HFSampler)."""
        if hasattr(self.sampler, "sync_weights"):  # LoRA: the engine gets the merged weights
            self.sampler.sync_weights(merged(self.model))

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
        self._sync_sampler()
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

    # ------------------------------------------------------------------ data
    def step_prompts(self, step: int) -> list:
        """The P examples of RL step ``step`` (1-based): epochs of seeded shuffles, no state."""
        P, N = self.cfg.rollout.prompts_per_step, len(self.train_examples)
        picked = []
        for i in range((step - 1) * P, step * P):
            epoch, pos = divmod(i, N)
            picked.append(self.train_examples[int(self._epoch_order(epoch)[pos])])
        return shard(picked, self.dist)

    def _rollout_seed(self, step: int, slot: int) -> int:
        """Seed of the sampling stream of prompt slot ``slot`` (this rank's numbering) of ``step``.

        Slots are numbered globally (rank r's step prompts follow ranks 0 … r − 1), so each
        prompt draws the same responses whatever the number of processes.
        """
        P_local = self.cfg.rollout.prompts_per_step // self.dist.world_size
        if slot < P_local:
            slot += self.dist.rank * P_local
        else:  # side-stream prompts (dynamic sampling, one process only)
            slot += self.cfg.rollout.prompts_per_step - P_local
        return stream_seed(self.cfg.seed, step, slot)

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
            seeds_for=lambda slots: [self._rollout_seed(step, slot) for slot in slots],
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
            texts_g, scores = score_rollout(self.tokenizer, self.task, greedy, examples)
            settings = self.sampling_settings
            terms = extra_terms(texts_g, examples, 1, settings)
            greedy_rewards = shaped_rewards(scores > 0, greedy.lengths, settings, terms)
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
        routing = None  # the MoE routing recorded with the old log-probs (recompute only)
        if cfg.rollout.old_logprobs_source == "sampler":
            old_logprobs = batch.sampler_logprobs
        elif cfg.algo.num_minibatches * cfg.algo.ppo_epochs == 1:
            old_logprobs = None  # one on-policy update: π_old is the update's own forward, detached
        else:
            routing = self.routing
            old_logprobs = batch_logprobs(
                self.model,
                batch,
                temperature=temperature,
                micro_batch_size=micro,
                routing=routing,
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
            with checkpointing_active(self.model):
                train_metrics, skipped = update_policy(
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
        if train_metrics:
            self._sync_sampler()  # the next rollout samples from the updated policy
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
        if self.dist.active:  # rollout statistics over every rank's responses, exactly
            gathered = [
                dist_lib.gather_cat(t, self.dist)
                for t in (rollout.correct, batch.lengths, batch.truncated)
            ]
            terms = dist_lib.gather_cat(rollout.terms.T, self.dist).T  # [n_terms, all rows]
            metrics |= rollout_metrics(*gathered, self.sampling_settings, terms)
        metrics = reduce_metrics(metrics, self.dist)
        metrics["throughput/tokens_per_s"] *= self.dist.world_size  # all ranks' tokens
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
            prompts = [e.prompt for e in part]
            greedy = self.sampler.generate(prompts, group_size=1, greedy=True)
            greedy_hits.append(score_rollout(self.tokenizer, self.task, greedy, part)[1])
            lengths.append(greedy.lengths.cpu())
            if k:
                sampled = self.sampler.generate(
                    prompts,
                    group_size=k,
                    temperature=self.cfg.train.eval_temperature,
                    seeds=[stream_seed(self.cfg.seed, -1, i) for i in range(s, s + len(part))],
                )
                texts = self.tokenizer.batch_decode(sampled.response_ids, skip_special_tokens=True)
                per_item = [texts[i * k : (i + 1) * k] for i in range(len(part))]
                for rec in evaluate_samples(self.task, part, per_item, ks=[k], ci=False)[0]:
                    records.append(
                        {key: v for key, v in rec.items() if "@" in key or key == "scores"}
                    )

        def gathered(parts: list) -> torch.Tensor:
            local = torch.cat(parts) if parts else torch.zeros(0)
            return dist_lib.gather_cat(local.double(), self.dist)

        greedy_all, lengths_all = gathered(greedy_hits), gathered(lengths)
        out = {
            "eval/greedy_acc": greedy_all.mean().item(),
            "eval/greedy_len_mean": lengths_all.mean().item(),
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
                        merged(self.critic.model), self.tokenizer, self.run_dir / "final" / "critic"
                    )
            dist_lib.barrier(self.dist)  # the final files are on disk before any rank returns
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
            "pass_at_k_start": first.get(f"eval/pass@{self.cfg.train.eval_samples}"),
            "pass_at_k_end": last.get(f"eval/pass@{self.cfg.train.eval_samples}"),
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
        if s["pass_at_k_start"] is not None:
            table.add_row(
                f"held-out pass@{self.cfg.train.eval_samples}",
                f"{s['pass_at_k_start']:.3f}",
                f"{s['pass_at_k_end']:.3f}",
            )
        table.add_row("steps", "0", str(s["steps"]))
        table.add_row("wall time", "", f"{s['wall_time_s']:.0f} s")
        self.console.print(table)
        self.console.print(
            f"metrics: {self.run_dir / 'metrics.jsonl'}   model: {self.run_dir / 'final'}   "
            f"plots: seqrl plot {self.run_dir}"
        )
