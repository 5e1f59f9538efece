"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""

import subprocess
import sys


def train_cli(overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``seqrl train --no-progress --set o ...`` in a fresh process, output captured."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *sets],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ExpertsObserver:
    """The top-k indices each MoE experts module actually received (independent of any router
    hooks under test): ``seen`` gets one [tokens, k] tensor per experts call."""

    def __init__(self, model):
        blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
        self.seen = []
        self.handles = [
            b.experts.register_forward_hook(lambda mod, args, out: self.seen.append(args[1]))
            for b in blocks
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


# Reward terms that fail inside a rollout worker (tests/train/test_async.py).
class WorkerBoom(BaseException):
    """Not an Exception: passes through the reward-term guard like an interpreter-level error."""


def reward_that_raises(completion: str, example) -> float:
    return 1 / 0


def reward_that_escapes(completion: str, example) -> float:
    raise WorkerBoom("escaped from a reward term")


def reward_that_exits(completion: str, example) -> float:
    import os

    os._exit(7)
