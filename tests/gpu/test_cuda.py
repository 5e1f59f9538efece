"""Training on a CUDA GPU: every preset and the main variants, two steps each (skipped without one).

On a GPU machine: ``python -m pytest tests/gpu -n 8`` (pytest-xdist; the runs are small, so
several share one GPU). The CPU suite runs the same code paths; these tests catch what only a
second device shows: a tensor left on the CPU beside one on the GPU, an NCCL collective given a
CPU tensor, bfloat16 kernels, FSDP2 with CUDA meshes. ``benchmarks/gpu_step.py`` measures speed
and memory on a few-hundred-million-parameter policy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqrl.config import list_presets, load_config
from seqrl.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRESETS = [name for name, _, _ in list_presets()]

VARIANTS = {
    "bf16": ["preset=gspo", "model.dtype=bfloat16"],
    "hf-engine": ["preset=grpo", "rollout.engine=hf"],
    "no-fast-paths": ["preset=gspo", "algo.packing=false", "algo.shared_prefix=false"],
    "lora": ["preset=gspo", "model.lora.r=4"],
    "async-k1": ["preset=dapo", "rollout.max_staleness=1"],
    "mismatch-truncate": ["preset=grpo", "algo.mismatch.correction=truncate"],
}


def _overrides(tmp_path: Path, name: str, *extra: str, moe: bool = False) -> list[str]:
    return [
        *extra,
        "device=cuda",
        "model.policy=builtin:" + ("tiny-moe-addition-noisy" if moe else "tiny-addition"),
        "rollout.prompts_per_step=8",
        "rollout.group_size=4",
        "task.eval_size=8",
        "train.eval_samples=2",
        "train.eval_every=0",
        "train.steps=2",
        "log.tensorboard=false",
        f"output_dir={tmp_path}",
        f"name={name}",
    ]


def _check_run(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["train/nonfinite_skipped"] == 0 for r in steps)
    assert (run / "final" / "config.json").exists()
    return steps


def _train(overrides: list[str]) -> tuple[Trainer, bool]:
    """Train; (the trainer, whether any trainable weight changed from its value before ``fit``).

    Compared with the weights as built (same dtype, same names), so a LoRA adapter or a
    bfloat16 cast cannot pass for a change.
    """
    trainer = Trainer(load_config(None, overrides), progress=False)
    before = {
        name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad
    }
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    return trainer, any(not torch.equal(before[n], after[n].detach()) for n in before)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_the_gpu(preset, tmp_path):
    extra = [f"preset={preset}"]
    if preset == "ppo":
        extra.append("critic.warmup_steps=1")
    overrides = _overrides(tmp_path, preset, *extra, moe="moe" in preset)
    if preset == "remax":  # group_size=1 after the shared settings
        overrides.append("rollout.group_size=1")
    trainer, moved = _train(overrides)
    assert next(trainer.model.parameters()).device.type == "cuda"
    steps = _check_run(tmp_path / preset)
    assert steps[-1]["policy/grad_norm"] > 0
    assert moved


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_train_on_the_gpu(variant, tmp_path):
    _, moved = _train(_overrides(tmp_path, variant, *VARIANTS[variant]))
    steps = _check_run(tmp_path / variant)
    assert steps[-1]["policy/grad_norm"] > 0
    assert moved


@pytest.mark.parametrize(
    "mixed", [[], ["dist.fsdp.param_dtype=bfloat16", "dist.fsdp.reduce_dtype=float32"]]
)
def test_fsdp_under_torchrun_with_nccl(mixed, tmp_path):
    """dist.strategy=fsdp on one GPU under torchrun: NCCL, a CUDA mesh, DCP checkpoints."""
    name = "fsdp" + ("-bf16" if mixed else "")
    sets = [
        arg
        for o in _overrides(tmp_path, name, "preset=dapo", "dist.strategy=fsdp", *mixed)
        for arg in ("--set", o)
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["-m", "seqrl", "train", "--no-progress", *sets]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ), check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    steps = _check_run(tmp_path / name)
    assert steps[-1]["policy/grad_norm"] > 0
