"""Rollouts: prompts in, sampled responses with their mask and log-probs out."""

from seqrl.rollout.fast import FastSampler
from seqrl.rollout.hf import HFSampler, RolloutBatch, Sampler, response_mask_from_tokens

__all__ = ["FastSampler", "HFSampler", "RolloutBatch", "Sampler", "response_mask_from_tokens"]
