"""Per-process memory of the policy's training state: replicate vs FSDP, 1 and 2 processes.

Part 1 (measured): a ~75M-parameter Qwen2 built from a config (float32, the character
vocabulary) takes one real optimiser step in each arm (world size 1 and 2, gloo, one thread
per process): a forward/backward of 2 × 64 tokens, the gradient reduction seqrl uses
(replicate: all_reduce_grads; fsdp: FSDP's reduce-scatter), one AdamW step. Then each process
counts the bytes it holds (local shards only):

    weights     the parameters (under FSDP: this process's DTensor shards)
    gradients   .grad of every parameter
    AdamW       exp_avg, exp_avg_sq and step of every parameter

These counts are exact and do not depend on machine load. Beside them, the accounting below
predicts them, and the process's peak RSS above its RSS before the model was built is shown
(ru_maxrss: it also holds activations, temporary buffers and allocator slack, and is noisy).

Part 2 (computed): the same per-parameter accounting for Qwen2.5-shaped 1.5B, 7B and 32B
policies on 8 GPUs (architectures instantiated on the meta device, so the parameter counts per
layer are exact), for replicate, fsdp and fsdp + CPU offload.

    python benchmarks/fsdp_memory.py            # both parts
    python benchmarks/fsdp_memory.py --table    # part 2 only (no training, a second)
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

MiB, GB = 2**20, 1e9

# ------------------------------------------------------------------ the accounting


@dataclass(frozen=True)
class Accounting:
    """Bytes per parameter of each kind of state (the settings of docs/scaling.md's table).

    Master weights, gradients and both AdamW moments in float32 (``model.dtype: float32``);
    FSDP computes with gathered bfloat16 weights (``dist.fsdp.param_dtype: bfloat16``) and
    reduces gradients in float32 (``reduce_dtype: float32``).
    """

    weights: int = 4
    grads: int = 4
    adamw: int = 8  # exp_avg + exp_avg_sq (the step counters are a few bytes per tensor)
    gathered: int = 2  # a bfloat16 copy of a gathered layer
    gathered_grad: int = 2 + 4  # a gathered layer's bfloat16 gradient and its float32 reduce copy

    @property
    def state(self) -> int:
        return self.weights + self.grads + self.adamw


def predicted_state_bytes(n_params: int, world: int, sharded: bool, acc=Accounting()) -> int:
    """Weights + gradients + AdamW per process: all of it replicated, or 1/world of it sharded."""
    return n_params * acc.state // (world if sharded else 1)


# ------------------------------------------------------------------ part 1: measured


def _model():
    from seqrl.models import build_tiny_model, build_tokenizer

    # ≈ 75M parameters: 12 layers of hidden 768 (GQA 12/4 heads), MLP 2048
    overrides = dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
    )
    return build_tiny_model(build_tokenizer(), size="tiny", seed=0, **overrides)


def _local_bytes(t) -> int:
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(rank: int, world: int, port: int, strategy: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from seqrl.train import sharding
    from seqrl.train.dist import DistInfo, all_reduce_grads

    start_rss = _rss_mib()
    model = _model()
    n_params = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp":
        mesh = sharding.device_mesh(torch.device("cpu"))
        sharding.shard_model(model, mesh, sharding.ShardSettings())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = torch.randint(
        0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank)
    )
    loss = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1).mean()
    loss.backward()
    if strategy == "replicate":
        all_reduce_grads(params, DistInfo(rank, world))
    grads = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    optimizer.step()
    row = {
        "n_params": n_params,
        "weights": sum(_local_bytes(p) for p in params),
        "grads": grads,
        "adamw": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()),
        "peak_rss": _rss_mib() - start_rss,
    }
    out[(strategy, world, rank)] = row
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure() -> list[str]:
    results = mp.Manager().dict()
    for world in (1, 2):
        for strategy in ("replicate", "fsdp"):
            args = (world, _free_port(), strategy, results)
            mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
    n = next(iter(results.values()))["n_params"]
    lines = [
        f"model: {n / 1e6:.1f}M parameters, float32; one AdamW step; per process, local bytes",
        "",
        "| strategy | processes | rank | weights (MiB) | gradients (MiB) | AdamW (MiB) "
        "| total (MiB) | accounting (MiB) | peak RSS above start (MiB, noisy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (strategy, world, rank), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0])):
        total = r["weights"] + r["grads"] + r["adamw"]
        predicted = predicted_state_bytes(n, world, strategy == "fsdp")
        lines.append(
            f"| {strategy} | {world} | {rank} | {r['weights'] / MiB:.1f} | {r['grads'] / MiB:.1f} "
            f"| {r['adamw'] / MiB:.1f} | {total / MiB:.1f} | {predicted / MiB:.1f} "
            f"| {r['peak_rss']:.0f} |"
        )
    return lines


# ------------------------------------------------------------------ part 2: computed

QWEN25 = {  # Qwen2.5 shapes (public config.json values)
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                tie_word_embeddings=False),
}  # fmt: skip


def parameter_counts(shape: dict) -> tuple[int, int, int]:
    """(all, one decoder layer, the root: embeddings + head + final norm) of a Qwen2 shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return total, layer, total - layer * len(model.model.layers)


def per_gpu(shape: dict, gpus: int, acc=Accounting()) -> dict[str, float]:
    """GB per GPU (and CPU RAM per process for offload), activations excluded."""
    total, layer, root = parameter_counts(shape)
    # FSDP's working set: the root (embeddings, head, norm; gathered for the whole forward) and
    # two decoder layers (the current one and the prefetched next) in bf16, plus one layer's
    # gathered gradient before its reduce-scatter
    working = (root + 2 * layer) * acc.gathered + layer * acc.gathered_grad
    return {
        "params": total / 1e9,
        "replicate": total * acc.state / GB,
        "fsdp": (total * acc.state / gpus + working) / GB,
        "offload_gpu": working / GB,
        "offload_cpu": total * acc.state / gpus / GB,
        "generate": total * acc.gathered / GB,
    }


def table(gpus: int = 8) -> list[str]:
    lines = [
        f"| policy | parameters | replicate | fsdp ({gpus} GPUs) | fsdp + CPU offload: GPU "
        "| … CPU RAM per process | + HF/fast generation (gathered bf16) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, shape in QWEN25.items():
        m = per_gpu(shape, gpus)
        lines.append(
            f"| {name} | {m['params']:.2f} B | {m['replicate']:.1f} GB | {m['fsdp']:.1f} GB "
            f"| {m['offload_gpu']:.1f} GB | {m['offload_cpu']:.1f} GB | +{m['generate']:.1f} GB |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only the computed 1.5B/7B/32B table")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    if not args.table:
        print("\n".join(measure()), end="\n\n")
    print("\n".join(table(args.gpus)))


if __name__ == "__main__":
    main()
