"""Shared settings for fast end-to-end runs on the nano model (≈0.1M params)."""

import pytest

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
