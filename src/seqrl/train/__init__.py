"""The training loop: one RL step (step.py), the trainer (trainer.py), checkpoints, metrics, ranks."""
