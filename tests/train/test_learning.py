"""The loop learns: a reward that the warm-started policy rarely earns rises within a few steps.

Reward 1 when the completion ends in the digit 7 (≈10% of samples at the start). This checks
the whole gradient path (sampler → rewards → advantages → loss → optimizer) on the real model;
a sign error anywhere makes the reward fall instead.
"""

from seqrl.config import load_config
from seqrl.train.trainer import Trainer


def test_reward_rises_on_a_shaped_task(tmp_path):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "name=learn",
            "optim.lr=1e-4",
            "rollout.prompts_per_step=16",
            "algo.num_minibatches=1",
            "train.steps=30",
            "log.tensorboard=false",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    trainer.task.score = lambda text, example: float(text.strip().endswith("7"))
    rewards = [trainer.train_step(step)["reward/mean"] for step in range(1, 31)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3, rewards
    assert last > 0.6, rewards
