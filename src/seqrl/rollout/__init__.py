"""Rollouts: prompts in, sampled responses with their mask and log-probs out.

``RolloutBatch`` and the ``Sampler`` protocol live in :mod:`seqrl.rollout.base`. ``HFSampler``
(transformers ``generate``) and ``FastSampler`` run everywhere; ``seqrl.rollout.vllm.VLLMSampler``
(a colocated vLLM engine, CUDA only) is imported on demand, never by ``import seqrl``.
"""

from seqrl.rollout.base import RolloutBatch, Sampler, response_mask_from_tokens
from seqrl.rollout.fast import FastSampler
from seqrl.rollout.hf import HFSampler

__all__ = ["FastSampler", "HFSampler", "RolloutBatch", "Sampler", "response_mask_from_tokens"]
