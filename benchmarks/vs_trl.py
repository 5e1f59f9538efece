"""seqrl vs TRL's GRPOTrainer on one machine: the same model, task, batch and update, side by side.

Shapes (``--shape``), each a randomly initialised Qwen2 (float32, the character tokenizer), GRPO
advantages, no KL term and one on-policy AdamW step per rollout (lr 1e-5, grad-norm clip 1):

- ``short``     3.37M parameters, 3-digit addition, 8 prompts × 8 samples, ≤ 8 new tokens (the
                random model almost never stops that early: every row is about 8 tokens)
- ``long``      3.37M parameters, the scratchpad task (5 operands of 3 digits: 19-character
                prompts, correct answers of 60-92 tokens), 8 prompts × 8 samples, ≤ 160 new
                tokens; a random model stops with probability ≈ 1/90 per token, so response
                lengths spread from 1 to 160 within a batch (median ≈ 50)
- ``g1``        as ``long`` with one sample per prompt: 64 prompts × 1 (SPPO's and PPO's shape);
                TRL refuses G = 1, so its check is lifted (its r − mean is 0 there); seqrl
                refuses a group-mean advantage at G = 1 and runs SPPO's, R − V(prompt), with
                the built-in 80k-parameter critic: a little work TRL does not do
- ``long-30m``  ``long`` on a 31.5M-parameter model (hidden 512, 10 layers, 8/4 heads, MLP 1536)

Arms, all starting from the same saved weights and run in one process:

- ``trl``        TRL ``GRPOTrainer`` (gradient checkpointing off: its fastest setting here)
- ``seqrl``      seqrl's ``Trainer.train_step`` with its defaults (no switches)
- ``seqrl-ref``  the reference paths: ``rollout.engine=hf`` (``model.generate``),
                 ``algo.shared_prefix=false``, ``algo.packing=false`` (one padded joint forward)
- ``raw``        the floor of a padded trainer: ``model.generate`` + one forward/backward over
                 all (padded) rows + AdamW

One round runs one step of every arm, in rotating order (TRL drives the loop; the other arms run
from its step-end callback, outside its timed span), so load on a shared machine hits every arm
alike. Medians over the rounds. Peak memory is each arm's maximum resident set in its own fresh
process (``--memory``). TRL is a benchmark-only dependency: without it the TRL arm is skipped.

    pip install torch==2.13.0 trl          # or into a venv with --system-site-packages
    python benchmarks/vs_trl.py            # today's shape, one thread, about 2 minutes on 2 cores
    python benchmarks/vs_trl.py --shape long --steps 10
    python benchmarks/vs_trl.py --threads 0                    # torch's default thread count
    python benchmarks/vs_trl.py --trl-gradient-checkpointing   # TRL's default setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seqrl.config import load_config
from seqrl.models import build_tiny_model, build_tokenizer, num_parameters, save_policy
from seqrl.tasks import get_task
from seqrl.train.trainer import Trainer

LR, SEED, TASK_SEED, N_EXAMPLES = 1e-5, 0, 1234, 512
MODEL_3M = dict(size="small", num_hidden_layers=4, intermediate_size=832)
MODEL_30M = dict(
    size="small",
    hidden_size=512,
    num_hidden_layers=10,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1536,
)
SCRATCHPAD = dict(digits=3, operands=5)


@dataclass(frozen=True)
class Shape:
    """One benchmark setting: the batch, the task and the model."""

    prompts: int  # P
    group_size: int  # G
    max_new: int  # new-token budget
    task: str
    task_kwargs: dict = field(default_factory=dict)
    model: dict = field(default_factory=lambda: MODEL_3M)

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    def build_task(self):
        return get_task(self.task, seed=TASK_SEED, **self.task_kwargs)


SHAPES = {
    "short": Shape(8, 8, 8, "addition", dict(digits=3)),
    "long": Shape(8, 8, 160, "scratchpad", SCRATCHPAD),
    "g1": Shape(64, 1, 160, "scratchpad", SCRATCHPAD),
    "long-30m": Shape(8, 8, 160, "scratchpad", SCRATCHPAD, MODEL_30M),
}
ARMS = {
    "seqrl": [],  # the defaults
    "seqrl-ref": ["rollout.engine=hf", "algo.shared_prefix=false", "algo.packing=false"],
}


G1_ADVANTAGE = ["algo.advantage=sppo", "critic.kind=scalar", "critic.model=builtin:nano"]


def seqrl_overrides(shape: Shape) -> list[str]:
    task = [f"task.{k}={v}" for k, v in shape.task_kwargs.items()]
    return [
        "preset=grpo",
        f"task.name={shape.task}",
        *task,
        f"task.seed={TASK_SEED}",
        f"rollout.prompts_per_step={shape.prompts}",
        f"rollout.group_size={shape.group_size}",
        f"rollout.max_new_tokens={shape.max_new}",
        "algo.num_minibatches=1",
        f"algo.micro_batch_size={shape.rows}",
        "algo.loss.kl_coef=0.0",
        f"optim.lr={LR}",
        "train.log_samples=0",
        f"seed={SEED}",
        # G = 1: seqrl refuses a group-mean advantage (always 0), so it runs SPPO's, R − V(prompt),
        # with the small built-in critic: work on top of TRL's (whose r − mean is 0 here)
        *(G1_ADVANTAGE if shape.group_size == 1 else []),
    ]


def save_model(path: Path, shape: Shape = SHAPES["short"]) -> None:
    tok = build_tokenizer()
    save_policy(build_tiny_model(tok, seed=SEED, **shape.model), tok, path)


# ---------------------------------------------------------------------------------- seqrl arms
class SeqrlArm:
    def __init__(self, name: str, model_dir: Path, run_dir: Path, shape: Shape) -> None:
        overrides = [*seqrl_overrides(shape), f"model.policy={model_dir}", *ARMS[name]]
        self.trainer = Trainer(load_config(None, overrides), run_dir=run_dir, progress=False)
        self.rows, self.step = shape.rows, 0

    def __call__(self) -> dict[str, float]:
        self.step += 1
        t = time.perf_counter()
        m = self.trainer.train_step(self.step)
        total = time.perf_counter() - t
        tokens = m["response_len/mean"] * self.rows
        return {"step": total, "rollout": m["time/rollout_s"], "tokens": tokens}


class RawArm:
    """The floor any trainer pays: generate, one forward/backward, one (fused) AdamW step."""

    def __init__(self, model_dir: Path, shape: Shape) -> None:
        from seqrl.models import load_policy

        self.model, self.tok = load_policy(str(model_dir))
        # fused, as TRL's default (transformers' adamw_torch_fused) and seqrl's
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)
        self.prompts = [e.prompt for e in shape.build_task().examples("train", N_EXAMPLES)]
        self.shape, self.step = shape, 0

    def __call__(self) -> dict[str, float]:
        P, G = self.shape.prompts, self.shape.group_size
        prompts = self.prompts[(self.step * P) % N_EXAMPLES :][:P]
        self.step += 1
        start = time.perf_counter()
        enc = self.tok(
            [p for p in prompts for _ in range(G)],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=self.shape.max_new,
                top_k=None,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.tok.eos_token_id,
            )
        rollout = time.perf_counter() - start
        self.model.train()
        attention = (out != self.tok.pad_token_id).long()
        attention[:, : enc["input_ids"].shape[1]] = enc["attention_mask"]
        logits = self.model(input_ids=out, attention_mask=attention, use_cache=False).logits
        loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = float(attention[:, enc["input_ids"].shape[1] :].sum())
        return {"step": time.perf_counter() - start, "rollout": rollout, "tokens": tokens}


# ------------------------------------------------------------------------------------ TRL arm
def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def build_trl(
    model_dir: Path, out_dir: Path, steps: int, checkpointing: bool, on_step_end, shape: Shape
):
    """A GRPOTrainer on the same model, task and batch; ``on_step_end`` runs after each step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from seqrl.models import load_policy

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = load_policy(str(model_dir))[1]
    task = shape.build_task()
    examples = task.examples("train", N_EXAMPLES)
    data = Dataset.from_dict(
        {"prompt": [e.prompt for e in examples], "idx": list(range(N_EXAMPLES))}
    )

    def reward(completions, idx, **_):
        return [float(r) for r in task.score_batch(completions, [examples[i] for i in idx])]

    G = shape.group_size
    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=shape.rows,
        gradient_accumulation_steps=1,
        num_generations=max(G, 2),  # the config refuses G = 1; lifted below
        max_completion_length=shape.max_new,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group" if G > 1 else "none",  # G = 1: r − mean = 0
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=steps,
        gradient_checkpointing=checkpointing,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        dataloader_num_workers=0,
    )
    args.num_generations = G
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
    )
    record: dict[str, float] = {}
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):  # the rollout: generation, rewards, advantages
        t = time.perf_counter()
        out = generate(inputs)
        record["rollout"] = time.perf_counter() - t
        record["tokens"] = float(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            record["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            record["step"] = time.perf_counter() - record.pop("start")
            on_step_end(dict(record))

    trainer.add_callback(Timer())
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict is not ours
    return trainer


# -------------------------------------------------------------------------------- the run
def make_arms(names: list[str], model_dir: Path, tmp: Path, shape: Shape) -> dict:
    arms = {}
    for name in names:
        if name == "raw":
            arms[name] = RawArm(model_dir, shape)
        elif name in ARMS:
            arms[name] = SeqrlArm(name, model_dir, tmp / name, shape)
    return arms


def run(args, model_dir: Path, tmp: Path) -> dict[str, list[dict]]:
    shape = SHAPES[args.shape]
    names = [a for a in args.arms if a != "trl"]
    arms = make_arms(names, model_dir, tmp, shape)
    results: dict[str, list[dict]] = {n: [] for n in args.arms}
    rounds = args.steps + args.warmup
    counter = {"round": 0}

    def others(trl_record: dict | None) -> None:
        r = counter["round"]
        counter["round"] += 1
        if trl_record is not None and r >= args.warmup:
            results["trl"].append(trl_record)
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        if r % 10 == 0:
            print(f"# round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name in order:
            rec = arms[name]()
            if r >= args.warmup:
                results[name].append(rec)

    if "trl" in args.arms:
        trl = build_trl(
            model_dir, tmp / "trl", rounds, args.trl_gradient_checkpointing, others, shape
        )
        trl.train()
    else:
        for _ in range(rounds):
            others(None)
    return results


def memory_probe(arm: str, model_dir: Path, checkpointing: bool, shape: str) -> float:
    """Peak RSS (MiB) of a fresh process that builds ``arm`` and runs 3 steps of it."""
    cmd = [sys.executable, __file__, "--probe", arm, "--model-dir", str(model_dir)]
    cmd += ["--shape", shape]
    cmd += ["--trl-gradient-checkpointing"] if checkpointing else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def probe(args) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shape = SHAPES[args.shape]
        if args.probe == "trl":
            build_trl(
                args.model_dir, tmp, 3, args.trl_gradient_checkpointing, lambda r: None, shape
            ).train()
        else:
            arm = make_arms([args.probe], args.model_dir, tmp, shape)[args.probe]
            [arm() for _ in range(3)]
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="short", choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=40, help="timed rounds (one step per arm)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["trl", "seqrl", "seqrl-ref", "raw"])
    parser.add_argument("--trl-gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every arm (0 = torch's default, one per core; on a shared machine "
        "more threads than free cores slows every arm down many times over)",
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS per arm (fresh processes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args)
    if "trl" in args.arms and not trl_available():
        print("# TRL is not installed: its arm is skipped (pip install torch==2.13.0 trl)")
        args.arms = [a for a in args.arms if a != "trl"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_model(tmp / "model", SHAPES[args.shape])
        results = run(args, tmp / "model", tmp)
        memory = (
            {
                a: memory_probe(a, tmp / "model", args.trl_gradient_checkpointing, args.shape)
                for a in args.arms
            }
            if args.memory
            else {}
        )
    report(args, results, memory)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "memory": memory}, indent=1))


def report(args, results: dict[str, list[dict]], memory: dict[str, float]) -> None:
    import transformers

    shape = SHAPES[args.shape]
    n_params = num_parameters(build_tiny_model(build_tokenizer(), seed=SEED, **shape.model))
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if trl_available():
        import trl

        versions += f", trl {trl.__version__}"
    print(
        f"# one RL step, shape {args.shape!r}: {n_params / 1e6:.2f}M-param Qwen2, {shape.task} "
        f"task, {shape.prompts} prompts × {shape.group_size} samples, ≤{shape.max_new} new "
        f"tokens, one AdamW step; TRL gradient checkpointing "
        f"{'on' if args.trl_gradient_checkpointing else 'off'}"
    )
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"{versions}; medians of {args.steps} rounds after {args.warmup} warm-up rounds\n"
    )
    med = {
        a: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for a, rs in results.items()
        if rs
    }
    print(
        "| arm | step (ms) | rollout (ms) | update (ms) | tokens/step | tokens/s | peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a, m in med.items():
        rss = f"{memory[a]:.0f}" if a in memory else "–"
        tokens = statistics.mean(r["tokens"] for r in results[a])
        rate = sum(r["tokens"] for r in results[a]) / sum(r["step"] for r in results[a])
        print(
            f"| {a} | {1e3 * m['step']:.1f} | {1e3 * m['rollout']:.1f} | "
            f"{1e3 * (m['step'] - m['rollout']):.1f} | {tokens:.0f} | {rate:.0f} | {rss} |"
        )
    print("\nrollout = generation + rewards + advantages; update = everything else in the step.")
    print(
        "tokens/step = sampled response tokens (EOS included), mean over rounds; tokens/s = all "
        "rounds' tokens over all rounds' step time (each arm samples its own responses, so with "
        "uneven lengths compare tokens/s as well as step time)."
    )

    def ratio(a: str, b: str, what: str) -> None:
        if a in med and b in med:
            print(f"{what}: {med[a]['step'] / med[b]['step']:.2f}×")
            per_round = [
                x["step"] / y["step"] for x, y in zip(results[a], results[b], strict=False)
            ]
            print(f"    (median of per-round ratios: {statistics.median(per_round):.2f}×)")

    print()
    ratio("trl", "seqrl", "speed-up of seqrl over TRL (TRL step / seqrl step)")
    ratio("seqrl-ref", "seqrl", "speed-up of seqrl's fast paths over its reference paths")
    ratio("seqrl-ref", "raw", "seqrl reference step / raw floor")
    ratio("seqrl", "raw", "seqrl step / raw floor")


if __name__ == "__main__":
    main()
