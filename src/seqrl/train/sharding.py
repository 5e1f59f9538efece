"""FSDP2 (``dist.strategy: fsdp``): sharded weights, gradients and AdamW state.

    mesh = device_mesh(device)                      # a CPU mesh under gloo, a CUDA one under NCCL
    model = shard_model(model, mesh, settings)      # fully_shard each decoder layer, then the root
    sampler = GatheredSampler(sampler, model, ...)  # generation on gathered weights
    Padding(model).most(n) ... .run(extra)          # fewer passes here: zero-weight ones
    for name, full in full_tensors(model): ...     # one gathered tensor at a time (vLLM push)
    plain = gather_full_model(model)                # a plain module with the full weights (final/)

Under FSDP every forward of a sharded module all-gathers its layer's weights from every process,
and every backward reduce-scatters its gradients: each one is a collective, so **every process
must run the same sequence of forwards and backwards**. The loop keeps three rules for that:

1. The optimiser pass and the log-prob and value passes pad a process's shorter share (the
   minibatches are chunks of one *global* permutation, so shares differ) with zero-weight
   passes (:class:`Padding`): a forward of one token whose output is multiplied by 0. It adds
   exactly 0 to every gradient, so the result is the one-process result, up to float rounding.
2. Generation (``model.generate`` or the fast sampler, whose lengths differ by process) runs on
   weights gathered once before it and freed after it: no collective inside the decode loop.
3. Gradients are summed over processes, not averaged (FSDP's default): each micro-batch loss is
   already its share of the *global* minibatch loss (:mod:`seqrl.train.optimize`).

Everything here is a no-op for a module that is not sharded, so ``dist.strategy: replicate``
(the default) runs exactly as before.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from seqrl.rollout import RolloutBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ShardSettings:
    """``dist.fsdp`` without the config object: what :func:`shard_model` needs."""

    param_dtype: str | None = None  # the gathered weights' dtype (None: keep the module's)
    reduce_dtype: str | None = None  # the gradient reduce-scatter's dtype (None: param_dtype)
    cpu_offload: bool = False
    reshard_after_forward: bool = True


# ------------------------------------------------------------------ mesh and wrapping


def device_mesh(device: torch.device):
    """A 1-d mesh over every process on ``device``'s type (the process group is started if needed).

    A single process (no ``torchrun``) gets a one-process group, so ``dist.strategy: fsdp``
    also runs, and resumes a sharded checkpoint, in one process. A CPU model stays on the CPU
    (the mesh's device type is the model's, never CUDA because a GPU happens to be visible).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    backend = dist.get_backend()
    if device.type == "cpu" and backend == "nccl":
        raise ValueError(
            "dist.strategy=fsdp on device=cpu needs the gloo backend, but the process group uses "
            "nccl: set SEQRL_DIST_BACKEND=gloo (or device=cuda)"
        )
    return init_device_mesh(device.type, (dist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP wraps one by one: instances of the model's ``_no_split_modules`` classes.

    Hugging Face names its decoder-layer classes there (``Qwen2DecoderLayer``,
    ``Qwen3MoeDecoderLayer``, ...), for a policy, a critic or a peft-wrapped model alike.
    """
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Sharded module → its structure with weights on the meta device (see :func:`gather_full_model`)."""


def shard_model(model: nn.Module, mesh, settings: ShardSettings) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model``, then the root (in place; returns it).

    Each layer's weights are all-gathered just before its forward and freed after it
    (``reshard_after_forward``), so a forward holds about one layer's full weights at a time.
    Gradients are reduce-scattered as sums (see the module docstring), in ``reduce_dtype``;
    parameters a process did not use in a backward contribute zeros, so MoE experts that no
    token of one process reached cannot desynchronise the reduce-scatter.
    """
    if settings.cpu_offload and mesh.device_type == "cpu":
        raise ValueError(
            "dist.fsdp.cpu_offload moves the shards from the GPU to CPU memory, but this run is "
            "on the CPU (its shards are in CPU memory already): set dist.fsdp.cpu_offload=false"
        )
    # FSDP warns about any view a sharded module returns (e.g. a critic head's logits), since
    # an in-place op on it would skip FSDP's backward hook; seqrl never writes into outputs.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    _SKELETONS[model] = _meta_skeleton(model)
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES.get(settings.param_dtype),
        reduce_dtype=DTYPES.get(settings.reduce_dtype),
    )
    offload = CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    layers = decoder_layers(model)
    if not layers:
        warnings.warn(
            f"{type(model).__name__} names no decoder-layer class in _no_split_modules: it is "
            "sharded as one block, so every forward gathers all its weights at once",
            stacklevel=2,
        )
    for layer in reversed(layers):  # inner ones first, should a listed class nest in another
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "generate"):  # a peft model's generate skips its own forward
        register_fsdp_forward_method(model, "generate")
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # a sum over processes, not a mean
        m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        _reduce_scatter_unused_params(m, mesh.size())
    return model


def _reduce_scatter_unused_params(module, world_size: int) -> None:
    """Reduce-scatter zeros for a parameter no forward used (an expert no token chose on this
    process), so every process makes the same collectives. One process has no one to disagree
    with; several need a torch that has the switch (2.13 has it, 2.11 does not)."""
    if hasattr(module, "set_reduce_scatter_unused_params"):
        module.set_reduce_scatter_unused_params(True, recurse=False)
    elif world_size > 1:
        raise RuntimeError(
            f"dist.strategy=fsdp on {world_size} processes needs a newer torch than "
            f"{torch.__version__} (FSDPModule.set_reduce_scatter_unused_params, in torch 2.13): "
            "upgrade torch, or use dist.strategy=replicate"
        )


def fsdp_modules(model) -> list[FSDPModule]:
    """The FSDP-wrapped modules of ``model`` (root last), empty when it is not sharded."""
    module = _module(model)
    if module is None:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)][::-1]


def is_sharded(model) -> bool:
    """True for a module sharded by :func:`shard_model` (or a reference calling one)."""
    module = _module(model)
    return isinstance(module, FSDPModule)


def _module(model) -> nn.Module | None:
    """The module behind ``model`` (a reference with adapters off wraps the policy)."""
    inner = getattr(model, "model", None) if not isinstance(model, nn.Module) else model
    return inner if isinstance(inner, nn.Module) else None


def has_sharded_params(params: list[nn.Parameter]) -> bool:
    """True when the parameters are FSDP shards (DTensors): FSDP reduces their gradients."""
    return any(isinstance(p, DTensor) for p in params)


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure whose parameters live on the meta device (no memory).

    Buffers are copied as they are (rotary tables and the like: small, and not always in the
    state dict). Tied parameters stay tied: the copy maps each parameter object once.
    """
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------ generation


@contextmanager
def gathered(model, reshard_after_forward: bool = True):
    """Within the block, every FSDP module of ``model`` holds its full weights (no collectives).

    One all-gather per layer on entry, freed on exit. Used for generation: a decode loop runs one
    forward per token and its length differs by process, so it must not all-gather per forward.
    """
    modules = fsdp_modules(model)
    with torch.no_grad():  # not inference mode: the gathered storage is reused by training
        for m in modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        root = modules[-1] if modules else None
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward and m is not root, recurse=False)


class GatheredSampler:
    """A :class:`~seqrl.rollout.Sampler` whose ``generate`` runs on the gathered policy.

    Each process holds the whole policy (in ``dist.fsdp.param_dtype``) while it generates, as
    verl's and TRL's Hugging Face rollouts under FSDP do; the decode loop then needs no
    collective, so processes may generate different numbers of tokens and batches.
    """

    def __init__(self, sampler, model, device: torch.device, reshard_after_forward: bool) -> None:
        self.sampler, self.model, self.device = sampler, model, device
        self.reshard_after_forward = reshard_after_forward

    def generate(self, prompts: list[str], **kwargs) -> RolloutBatch:
        with gathered(self.model, self.reshard_after_forward):
            return self.sampler.generate(prompts, **kwargs)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.sampler.encode(prompts)
        return ids.to(self.device), mask.to(self.device)  # CPU-offloaded shards live on the CPU

    def sync_weights(self) -> None:
        self.sampler.sync_weights()

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)


# ------------------------------------------------------------------ collectives in step


class Padding:
    """Equal numbers of forward (and backward) passes on every process under FSDP.

    Before a loop of ``n`` passes, :meth:`most` agrees on the busiest process's count (one
    all-reduce); after it, :meth:`run` makes the missing ones as zero-weight passes: one token
    through the model, its output summed and multiplied by 0, so every FSDP collective runs and
    every gradient gains exactly 0. For a module that is not sharded both are no-ops.
    """

    def __init__(self, model, *, backward: bool = False) -> None:
        self.model, self.backward = model, backward
        module = _module(model)
        self.active = isinstance(module, FSDPModule)
        self.device = _compute_device(module) if self.active else None

    def most(self, n: int) -> int:
        """The largest ``n`` over processes (a collective when sharded)."""
        if not self.active:
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def run(self, extra: int) -> None:
        """``extra`` zero-weight passes (forward, and backward when ``backward``)."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # [1, 1] token 0
        for _ in range(extra):
            with torch.set_grad_enabled(self.backward):
                out = self.model(
                    input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False
                )
                if self.backward:
                    (out.logits.float().sum() * 0.0).backward()


def train_padding(model) -> Padding | None:
    """``pad`` for :func:`seqrl.train.optimize.optimizer_pass`: None unless ``model`` is sharded."""
    return Padding(model, backward=True) if is_sharded(model) else None


def _compute_device(module: nn.Module) -> torch.device:
    """Where the sharded module computes: its mesh's device (CUDA also when shards are offloaded)."""
    param = next(module.parameters())
    if isinstance(param, DTensor) and param.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for FSDP shards: the norm over every process's shards."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # Σ of the shards' squared norms over processes, then √
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ------------------------------------------------------------------ full weights


def full_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) of each state-dict entry, gathered one at a time (a collective each).

    Every process must consume the whole iterator, in the same order; each full tensor lives
    only until the consumer drops it.
    """
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_full_model(model: nn.Module, *, to_all: bool = False) -> nn.Module | None:
    """A plain (unsharded) copy of ``model`` on the CPU, built one gathered tensor at a time.

    Every process must call it. Rank 0 (with ``to_all``: every process) gets the copy, the
    others None. Device memory stays near one tensor above the shards; the copy itself is in
    CPU memory, as ``save_pretrained`` needs it. Tied weights stay tied.
    """
    for m in fsdp_modules(model):  # the registered parameters are the shards again
        m.reshard()
    plain = copy.deepcopy(_SKELETONS[model])
    keep = to_all or dist.get_rank() == 0
    slots: dict[int, list[tuple[nn.Module, str]]] = {}  # meta parameter → where it sits
    for module in plain.modules():
        for key, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, key))
    skeleton_params = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if not keep:
            continue
        target = skeleton_params[name]
        new = nn.Parameter(full.detach().to("cpu", copy=True), requires_grad=target.requires_grad)
        for module, key in slots[id(target)]:
            module._parameters[key] = new
    return plain if keep else None
