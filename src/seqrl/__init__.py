"""seqrl: reinforcement learning of language models on verifiable rewards.

GSPO (arXiv 2507.18071), SPPO (arXiv 2604.08865), FIPO (arXiv 2603.19835) and the baselines they
are measured against (GRPO, DAPO, Dr. GRPO, PPO-GAE, RLOO, ReMax). The exact maths lives in
:mod:`seqrl.core`; see ``docs/algorithms.md``.

The Python API (:mod:`seqrl.api`), imported on first use so that ``import seqrl`` stays light:
``seqrl.RLTrainer``, ``seqrl.SFTTrainer``, ``seqrl.evaluate``, ``seqrl.load_config``,
``seqrl.RunResult``, ``seqrl.SFTResult``.
"""

__version__ = "0.1.0"

_API = ("RLTrainer", "RunResult", "SFTResult", "SFTTrainer", "evaluate", "load_config")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from seqrl import api

        return getattr(api, name)
    raise AttributeError(f"module 'seqrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
