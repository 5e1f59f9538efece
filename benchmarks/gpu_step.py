"""RL steps of a few-hundred-million-parameter policy on one GPU: step time, tokens/s, peak memory.

A Llama-shaped stand-in built from a config (``seqrl.models.pretrained.write_stand_in``: hidden
1024, 18 layers, 16 heads, a 512-token BPE vocabulary; 269.5M parameters) trains GSPO on
3-digit addition, plus a dense reward term (the share of digits in the response) so that the
advantages and gradients are not zero. Its answers are random text that rarely stops early
(about 212 of at most 256 tokens on average on an H200): the step does long generation, the
θ_old forward and one forward/backward/AdamW pass over every token. Each arm runs in its own process (FSDP arms under
``torchrun --nproc_per_node 1``, so FSDP2, NCCL and the mixed-precision policy run for real, on
one shard), after one warm-up step that is not counted:

    replicate-fp32       model.dtype=float32, no wrapper (the default on one GPU)
    replicate-bf16       model.dtype=bfloat16: weights, gradients and AdamW state in bfloat16
    replicate-bf16-hf    the same, sampling with transformers' generate (rollout.engine=hf)
                         instead of seqrl's fast sampler
    replicate-bf16-async-k1
                         replicate-bf16 with rollout.max_staleness=1: a rollout worker process
                         on the same GPU samples the next step while the trainer updates
                         (compare its step time with replicate-bf16's)
    fsdp-bf16            dist.strategy=fsdp, float32 master weights, bfloat16 compute,
                         float32 gradient reduction (the recommended multi-GPU setting)
    fsdp-bf16-offload    the same with dist.fsdp.cpu_offload=true (shards, grads, AdamW on the CPU)

Peak memory is ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved`` (what the
caching allocator took) over the timed steps; tokens/s counts response tokens (the trainer's
``throughput/tokens_per_s``). On a CPU (``--device cpu`` and a smaller ``--hidden``) it runs the
same arms without the memory columns, to check the script.

    python benchmarks/gpu_step.py                                  # on a CUDA machine
    python benchmarks/gpu_step.py --device cpu --hidden 64 --layers 2 --heads 4 --steps 2 \\
        --max-new-tokens 16 --arms replicate-fp32 fsdp-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "replicate-fp32": ["model.dtype=float32"],
    "replicate-bf16": ["model.dtype=bfloat16"],
    "replicate-bf16-hf": ["model.dtype=bfloat16", "rollout.engine=hf"],
    "replicate-bf16-async-k1": ["model.dtype=bfloat16", "rollout.max_staleness=1"],
    "fsdp-bf16": [
        "dist.strategy=fsdp",
        "dist.fsdp.param_dtype=bfloat16",
        "dist.fsdp.reduce_dtype=float32",
    ],
    "fsdp-bf16-offload": [
        "dist.strategy=fsdp",
        "dist.fsdp.param_dtype=bfloat16",
        "dist.fsdp.reduce_dtype=float32",
        "dist.fsdp.cpu_offload=true",
    ],
}


def digit_share(completion: str, example) -> float:
    """A dense reward term: the share of digits in the response, so advantages are not all 0."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def build_model(out: Path, hidden: int, layers: int, heads: int) -> int:
    """Write the stand-in (tokenizer trained on addition text); return its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqrl.models.pretrained import write_stand_in

    rng = random.Random(0)
    texts = [
        f"{rng.randrange(1000)}+{rng.randrange(1000)}={rng.randrange(2000)}" for _ in range(2000)
    ]
    write_stand_in(out, texts, architecture="llama", hidden_size=hidden, layers=layers, heads=heads)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    return sum(p.numel() for p in model.parameters())


def worker(args: argparse.Namespace) -> None:
    """One arm: train ``--steps`` + 1 steps, print one ``RESULT {json}`` line."""
    import torch
    from rich.console import Console

    from seqrl.config import load_config
    from seqrl.train.metrics import read_metrics
    from seqrl.train.trainer import Trainer

    cuda = args.device == "cuda"
    name = f"bench-{args.worker}"
    run_dir = args.out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        None,
        [
            "preset=gspo",
            f"model.policy={args.out / 'model'}",
            "task.name=addition",
            "reward.terms=[{fn: 'gpu_step:digit_share', weight: 1.0}]",
            f"rollout.prompts_per_step={args.prompts}",
            f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"train.steps={args.steps + 1}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.eval_samples=1",
            "task.eval_size=8",
            f"device={args.device}",
            f"output_dir={args.out / 'runs'}",
            f"name={name}",
            *ARMS[args.worker],
        ],
    )
    peaks = [0.0, 0.0]

    class Measured(Trainer):
        """Resets the peaks after the warm-up step; reads them after each timed step."""

        def train_step(self, step: int) -> dict[str, float]:
            if cuda and step == 2:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            metrics = super().train_step(step)
            if cuda and step >= 2:
                peaks[0] = max(peaks[0], torch.cuda.max_memory_allocated() / 2**30)
                peaks[1] = max(peaks[1], torch.cuda.max_memory_reserved() / 2**30)
            return metrics

    trainer = Measured(cfg, progress=False, console=Console(quiet=True))
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir) if "time/step_s" in r][1:]  # drop the warm-up
    result = {
        "arm": args.worker,
        "step_s": statistics.median(r["time/step_s"] for r in rows),
        "rollout_s": statistics.median(r["time/rollout_s"] for r in rows),
        "tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in rows),
        "response_len": statistics.mean(r["response_len/mean"] for r in rows),
        "grad_norm": rows[-1].get("policy/grad_norm", float("nan")),
        "loss_finite": all(math.isfinite(r["loss/policy"]) for r in rows if "loss/policy" in r),
        "peak_alloc_gib": peaks[0] if cuda else None,
        "peak_reserved_gib": peaks[1] if cuda else None,
        "wall_s": wall,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)


def launch(arm: str, args: argparse.Namespace) -> dict | str:
    """Run one arm in a fresh process; its RESULT dict, or the tail of its output on failure."""
    me = [
        str(Path(__file__).resolve()),
        "--worker",
        arm,
        *("--out", str(args.out), "--device", args.device, "--steps", str(args.steps)),
        *("--prompts", str(args.prompts), "--group", str(args.group)),
        *("--max-new-tokens", str(args.max_new_tokens)),
    ]
    if ARMS[arm][0].startswith("dist."):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    else:
        cmd = [sys.executable]
    try:
        proc = subprocess.run(
            cmd + me, capture_output=True, text=True, timeout=args.arm_timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        metrics = args.out / "runs" / f"bench-{arm}" / "metrics.jsonl"
        done = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        times = [
            {k: round(r[k], 2) for k in ("step", "time/rollout_s", "time/train_s") if k in r}
            for r in done
            if "time/step_s" in r
        ]
        return f"timed out after {args.arm_timeout_s} s; steps done: {times}"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return f"exit {proc.returncode}: " + (proc.stdout + proc.stderr)[-1500:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-gpu"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after 1 warm-up)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--arm-timeout-s", type=int, default=240)
    p.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_params = build_model(args.out / "model", args.hidden, args.layers, args.heads)
    print(
        f"policy: llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads: "
        f"{n_params / 1e6:.1f}M parameters (built in {time.perf_counter() - t0:.0f} s); "
        f"{args.prompts} prompts x {args.group} responses, <= {args.max_new_tokens} new tokens",
        flush=True,
    )
    header = "| arm | step s | tokens/s | mean response | peak allocated GiB | peak reserved GiB |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    device = None
    for arm in args.arms:
        r = launch(arm, args)
        if isinstance(r, str):
            print(f"{arm}: FAILED {r}", flush=True)
            lines.append(f"| {arm} | failed | | | | |")
            continue
        device = r["device"]
        print(f"{arm}: {json.dumps(r)}", flush=True)
        mem = [
            f"{r[k]:.2f}" if r[k] is not None else "-"
            for k in ("peak_alloc_gib", "peak_reserved_gib")
        ]
        lines.append(
            f"| {arm} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['response_len']:.0f} | "
            + " | ".join(mem)
            + " |"
        )
    print(f"\ndevice: {device}; torch {__import__('torch').__version__}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
