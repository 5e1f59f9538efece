"""seqrl: reinforcement learning of language models on verifiable rewards.

GSPO (arXiv 2507.18071), SPPO (arXiv 2604.08865), FIPO (arXiv 2603.19835) and the baselines they
are measured against (GRPO, DAPO, Dr. GRPO, PPO-GAE, RLOO, ReMax). The exact maths lives in
:mod:`seqrl.core`; see ``docs/algorithms.md``.
"""

__version__ = "0.1.0"
