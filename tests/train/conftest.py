"""Shared settings for fast end-to-end runs on the nano model (≈0.1M params), and fixtures."""

import pytest
import torch
import transformers.models.qwen2.modeling_qwen2 as qwen2

FAST = [
    "model.policy=builtin:nano",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.eval_size=8",
    "train.eval_samples=2",
    "train.eval_every=0",
    "algo.micro_batch_size=8",
    "log.tensorboard=false",
]


@pytest.fixture
def fast_overrides(tmp_path):
    return [*FAST, f"output_dir={tmp_path}", "name=run"]


@pytest.fixture
def float64_norms(monkeypatch):
    """Qwen2's RMSNorm computes in float32 even in a float64 model; two forward layouts that sum
    gradients in different orders would then agree only to float32 rounding (~1e-7 relative).
    With the norm in full precision the comparison is exact to float64 rounding."""

    def forward(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(qwen2.Qwen2RMSNorm, "forward", forward)
