"""A colocated vLLM engine behind the :class:`~seqrl.rollout.Sampler` protocol (CUDA only).

    sampler = VLLMSampler(policy, tokenizer, max_new_tokens=..., work_dir=...)
    batch = sampler.generate(prompts, group_size=G, seeds=[...])    # RolloutBatch, as HFSampler
    ... optimiser step on ``policy`` ...
    sampler.sync_weights()                                           # push θ to the engine

Each process (each ``torchrun`` rank) runs its own engine on its own GPU, sharing it with the
trainer (``rollout.vllm.gpu_memory_utilization`` bounds vLLM's share). The engine starts from
the policy saved in Hugging Face format and receives the policy's weights, by their Hugging
Face names, after every optimiser step. Each prompt's samples use vLLM's per-request seeds, so
a prompt's responses do not depend on the rest of the batch (though they differ from
HFSampler's for the same seed). The returned log-probs are μ, the distribution vLLM sampled
from after temperature and top-p (``logprobs_mode="processed_logprobs"``).

Status: this path has not yet been run on a GPU by the project's test suite (its tests skip
without vLLM and CUDA). Importing seqrl never imports vLLM.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from seqrl.rollout.base import RolloutBatch, encode_prompts, response_mask_from_tokens
from seqrl.rollout.hf import row_seeds

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM on a CUDA machine: pip install 'seqrl[vllm]' "
    "(or use rollout.engine=hf, which runs everywhere)"
)

# Prefixes wrappers add to parameter names: DDP, torch.compile, FSDP1, activation checkpointing.
_WRAPPER_PREFIX = re.compile(
    r"^(?:module\.|_orig_mod\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.)+"
)


def import_vllm():
    """The vllm module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"{INSTALL_HINT}: no CUDA device is visible")
    return vllm


def hf_weight_items(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator:
    """(Hugging Face name, tensor) of every weight vLLM loads, from a training-side module.

    The names are those ``save_pretrained`` writes (what vLLM's ``load_weights`` expects):
    wrapper prefixes are stripped, and ``lm_head.weight`` is left out when the model ties it
    to the input embedding (as ``save_pretrained`` does). Tensors are detached and cast to
    ``dtype`` (None keeps theirs). An FSDP shard (DTensor) is gathered when its item is
    reached, so a consumer that drops each tensor holds one full tensor at a time; every
    process must then consume the items in the same order.
    """
    config = getattr(_unwrap(model), "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        name = _WRAPPER_PREFIX.sub("", name)
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):  # a buffer computed from the config
            continue
        tensor = tensor.detach()
        if isinstance(tensor, DTensor):  # dist.strategy=fsdp: all-gather this one tensor
            tensor = tensor.full_tensor()
        yield name, tensor if dtype is None else tensor.to(dtype)


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """A module ``save_pretrained`` can write: unwrapped, or gathered on every process (FSDP)."""
    from seqrl.train.sharding import gather_full_model, is_sharded

    return gather_full_model(model, to_all=True) if is_sharded(model) else _unwrap(model)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


class VLLMSampler:
    """Sampler on a colocated ``vllm.LLM``; same ``generate`` contract as ``HFSampler``."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        work_dir: str | Path,
        temperature: float = 1.0,
        top_p: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        dtype: str = "auto",
        seed: int = 0,
        world_size: int = 1,
    ) -> None:
        if tokenizer.padding_side != "left":
            raise ValueError("generation needs a left-padding tokenizer (padding_side='left')")
        # the engine core in this process, so the weights can be reached and replaced
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        from seqrl.models import save_policy

        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        init_dir = save_policy(_plain(model), tokenizer, Path(work_dir) / "vllm-init")
        kwargs = {}
        if world_size > 1:  # one engine per torchrun rank, launched by torchrun itself
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(
            model=str(init_dir),
            tokenizer=str(init_dir),
            dtype=str(model.dtype).removeprefix("torch.") if dtype == "auto" else dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            tensor_parallel_size=1,
            seed=seed,
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self._vllm = vllm

    # ------------------------------------------------------------------ weights
    def _engine_model(self):
        engine = self.llm.llm_engine
        for path in (
            "model_executor.driver_worker.worker.model_runner.model",
            "model_executor.driver_worker.model_runner.model",
            "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
        ):
            obj = engine
            try:
                for attr in path.split("."):
                    obj = getattr(obj, attr)
                return obj
            except AttributeError:
                continue
        return None

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module | None = None) -> None:
        """Push the policy's current weights into the engine (after every optimiser step).

        ``model`` defaults to the policy this sampler was built on, LoRA adapters merged in.
        An FSDP-sharded policy (``dist.strategy: fsdp``) is pushed one full tensor at a time:
        each is all-gathered, handed to the engine and dropped before the next.
        """
        from seqrl.train.sharding import is_sharded

        sharded = is_sharded(self.model if model is None else model)
        if model is None:
            from seqrl.models.lora import merged

            model = self.model if sharded else merged(self.model)  # (LoRA is refused under FSDP)
        target = self._engine_model()
        if target is not None:
            items = hf_weight_items(model)  # lazy: one gathered tensor alive at a time
            target.load_weights(items if sharded else list(items))
        elif hasattr(self.llm, "collective_rpc"):
            if sharded:  # one call per tensor, so the whole model is never gathered at once
                for item in hf_weight_items(model):
                    self.llm.collective_rpc(_load_weights_rpc, args=([item],))
            else:
                self.llm.collective_rpc(_load_weights_rpc, args=(list(hf_weight_items(model)),))
        else:
            raise RuntimeError(
                "cannot reach the vLLM model to update its weights with this vLLM version; "
                "set VLLM_ENABLE_V1_MULTIPROCESSING=0 or use rollout.engine=hf"
            )
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV of the old weights must not be reused

    # ------------------------------------------------------------------ sampling
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return encode_prompts(self.tokenizer, prompts, self.model.device)

    def generate(
        self,
        prompts: list[str],
        *,
        group_size: int,
        greedy: bool = False,
        temperature: float | None = None,
        seeds: list[int] | None = None,
    ) -> RolloutBatch:
        """``group_size`` responses per prompt (rows i·G … i·G + G − 1), or one greedy each."""
        temperature = self.temperature if temperature is None else temperature
        repeated = [p for p in prompts for _ in range(group_size)]
        prompt_ids, prompt_mask = self.encode(repeated)  # [B, Lp] left-padded
        per_row = row_seeds(seeds, group_size) if seeds is not None else [None] * len(repeated)
        params = [
            self._vllm.SamplingParams(
                max_tokens=self.max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else self.top_p,
                seed=None if greedy else seed,
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=[self.tokenizer.eos_token_id],
                skip_special_tokens=False,
            )
            for seed in per_row
        ]
        token_prompts = [
            {"prompt_token_ids": ids[m].tolist()}
            for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        return self._to_batch(outputs, prompt_ids, prompt_mask, group_size)

    def _to_batch(self, outputs, prompt_ids, prompt_mask, group_size: int) -> RolloutBatch:
        B, pad = len(outputs), self.tokenizer.pad_token_id
        T = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        response_ids = torch.full((B, T), pad, dtype=torch.long)
        logprobs = torch.zeros(B, T, dtype=torch.float32)
        for i, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            for t, (tok, entry) in enumerate(zip(ids, sample.logprobs or [], strict=False)):
                logprobs[i, t] = entry[tok].logprob
        device = prompt_ids.device
        response_ids, logprobs = response_ids.to(device), logprobs.to(device)
        mask, truncated = response_mask_from_tokens(response_ids, self.tokenizer.eos_token_id)
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))  # [B, T]
        return RolloutBatch(
            prompt_ids, prompt_mask, response_ids, mask, logprobs, truncated, group_size
        )


def _load_weights_rpc(worker, items) -> None:
    """Runs inside a vLLM worker (``collective_rpc``): load (name, tensor) pairs."""
    worker.model_runner.model.load_weights(items)
