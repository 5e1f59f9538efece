"""One RL step of seqrl, split by phase, against the raw cost of the same work.

Fixed tiny config: the built-in model, 8 prompts × 8 samples, ≤ 16 new tokens, one minibatch.
"raw" is the floor any trainer pays: ``model.generate`` + one forward/backward over the batch +
one AdamW step. seqrl's step adds scoring, the θ_old log-prob recomputation and its bookkeeping;
the last column is its overhead over the raw floor. Phases are timed alternately in one process.

    python benchmarks/step_throughput.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from seqrl.config import load_config
from seqrl.train.sampling import score_rollout
from seqrl.train.step import batch_logprobs, compute_advantages, update_policy
from seqrl.train.trainer import Trainer


def raw_step(trainer: Trainer, prompts: list[str]) -> float:
    """generate + one forward/backward on all rows + one AdamW step, nothing else."""
    model, tok, G = trainer.model, trainer.tokenizer, trainer.cfg.rollout.group_size
    start = time.perf_counter()
    enc = tok(
        [p for p in prompts for _ in range(G)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    out = model.generate(
        **enc,
        do_sample=True,
        max_new_tokens=trainer.max_new_tokens,
        top_k=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    attention = (out != tok.pad_token_id).long()
    attention[:, : enc["input_ids"].shape[1]] = enc["attention_mask"]
    logits = model(input_ids=out, attention_mask=attention, use_cache=False).logits
    loss = torch.log_softmax(logits.float(), -1).mean()
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def seqrl_step(trainer: Trainer, step: int) -> dict[str, float]:
    """seqrl's step with each phase timed."""
    cfg, G = trainer.cfg, trainer.cfg.rollout.group_size
    times = {}
    t = time.perf_counter()
    examples = trainer.prompts.step_examples(step)
    batch = trainer.sampler.generate([e.prompt for e in examples], group_size=G)
    times["rollout"] = time.perf_counter() - t
    t = time.perf_counter()
    _, rewards = score_rollout(trainer.tokenizer, trainer.task, batch, examples)
    adv = compute_advantages(cfg.algo.advantage, rewards, G, eps=cfg.algo.adv_eps)
    times["scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    single_update = cfg.algo.num_minibatches * cfg.algo.ppo_epochs == 1  # as the trainer decides
    old = (
        None
        if single_update
        else batch_logprobs(
            trainer.model,
            batch,
            temperature=cfg.rollout.temperature,
            micro_batch_size=cfg.algo.micro_batch_size,
        )
    )
    times["old_logprobs"] = time.perf_counter() - t
    t = time.perf_counter()
    update_policy(
        trainer.model,
        trainer.optimizer,
        batch,
        adv,
        old,
        None,
        trainer.update_settings,
        torch.Generator().manual_seed(step),
    )
    times["update"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    t = time.perf_counter()  # what the θ_old pass costs when it is needed (several minibatches)
    batch_logprobs(
        trainer.model,
        batch,
        temperature=cfg.rollout.temperature,
        micro_batch_size=cfg.algo.micro_batch_size,
    )
    times["recompute_pass"] = time.perf_counter() - t
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    overrides = [
        "rollout.prompts_per_step=8",
        "rollout.group_size=8",
        "rollout.max_new_tokens=16",
        "algo.num_minibatches=1",
        "algo.micro_batch_size=64",
    ]
    trainer = Trainer(load_config(None, overrides), progress=False)
    prompts = [e.prompt for e in trainer.prompts.step_examples(1)]
    raw_step(trainer, prompts), seqrl_step(trainer, 1)  # warm-up
    raw, ours = [], []
    for step in range(2, args.steps + 2):
        raw.append(raw_step(trainer, [e.prompt for e in trainer.prompts.step_examples(step)]))
        ours.append(seqrl_step(trainer, step))
    med = {k: statistics.median(o[k] for o in ours) for k in ours[0]}
    raw_med = statistics.median(raw)
    print(
        f"# one RL step: 8 prompts × 8 samples, ≤16 new tokens, {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M params"
    )
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps\n"
    )
    print("| phase | seqrl (ms) |")
    print("|---|---:|")
    for key in ("rollout", "scoring", "old_logprobs", "update", "total"):
        print(f"| {key} | {1e3 * med[key]:.1f} |")
    print(f"\nraw floor (generate + forward/backward + AdamW): {1e3 * raw_med:.1f} ms")
    print(f"seqrl overhead over the raw floor: {100 * (med['total'] / raw_med - 1):+.1f}%")
    print(
        f"with a separate θ_old pass (needed with several minibatches per rollout): "
        f"{100 * ((med['total'] - med['old_logprobs'] + med['recompute_pass']) / raw_med - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
