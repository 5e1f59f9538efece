"""Rollouts: prompts in, sampled responses with their mask and log-probs out.

``HFSampler`` (transformers ``generate``) runs everywhere; ``seqrl.rollout.vllm.VLLMSampler``
(a colocated vLLM engine, CUDA only) is imported on demand, never by ``import seqrl``.
"""

from seqrl.rollout.fast import FastSampler
from seqrl.rollout.hf import HFSampler, RolloutBatch, Sampler, response_mask_from_tokens

__all__ = ["FastSampler", "HFSampler", "RolloutBatch", "Sampler", "response_mask_from_tokens"]
