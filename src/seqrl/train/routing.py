"""One rollout's MoE routing: recorded at θ_old, optionally replayed in the updates, and its churn.

The old-log-prob pass records, for every MoE layer, the top-k experts of every token of the
rollout, laid out as the batch is (prompt columns then response columns: [layers, B, Lp + T, k]).
Each training forward of the updates then

- captures the router's own top-k for its tokens, and compares it with the recording at the
  positions that score a response token (the last prompt token and every response token but the
  last; their outputs are the logits of the ratio π_θ(y_t)/π_old(y_t)). The comparison counts
  only forwards after at least one optimizer step of this rollout: before it θ = θ_old;
- with ``replay=True`` (Routing Replay, R2), routes every token through its recorded experts,
  with weights from the current router (see :mod:`seqrl.models.moe`), so the token ratios compare
  one sub-network with itself;
- with ``reroute_frac=p > 0`` (a testbed knob, ``moe.reroute_frac``), re-routes a random share p
  of the (token, layer) pairs of every forward after the rollout's first optimizer step
  (:func:`seqrl.models.moe.reroute`): routing churn of a chosen size on top of the real one.
  Under replay the recorded experts are used all the same; the churn metrics count it.

Metrics (one dict per step, pooled over the step's off-policy forwards):
    moe/routing_churn            share of (response token, layer) pairs whose top-k set under π_θ
                                 (the router's own choice, also under replay) differs from π_old
    moe/routing_churn/layer_{i}  the same for layer i (0 = closest to the embeddings)
    moe/expert_change            mean |E_new \\ E_old| / k (the reading of GSPO §5.3's "10%")
    moe/load_cv                  coefficient of variation of expert load under π_old on the
                                 response-scoring positions, mean over layers (0 = even load)
    moe/load_max                 the busiest expert's load over the mean load, mean over layers
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

import seqrl.core as C
from seqrl.models.moe import RouterHooks
from seqrl.rollout import RolloutBatch


def scoring_positions(joint_width: int, resp_mask: Tensor) -> Tensor:
    """Bool [b, Lj]: the joint positions whose output scores a valid response token.

    The forward's columns are [prompt (Lp) | response (T)], Lj = Lp + T; response token t is
    scored by the output at column Lp − 1 + t.
    """
    b, T = resp_mask.shape
    positions = torch.zeros(b, joint_width, dtype=torch.bool, device=resp_mask.device)
    positions[:, joint_width - T - 1 : joint_width - 1] = resp_mask
    return positions


class RolloutRouting:
    """Routing capture (and optional replay) of a policy's training forwards; see the module doc."""

    def __init__(self, model, *, replay: bool, reroute_frac: float = 0.0) -> None:
        forcing = replay or reroute_frac > 0
        if forcing and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ValueError(
                "moe.routing_replay and moe.reroute_frac cannot be combined with gradient "
                "checkpointing: the recomputed forward would route by itself; turn gradient "
                "checkpointing off"
            )
        self.hooks = RouterHooks(model)
        if self.hooks.num_experts > torch.iinfo(torch.int16).max:
            raise ValueError(f"{self.hooks.num_experts} experts do not fit the int16 record")
        self.replay = replay
        self.reroute_frac = reroute_frac
        self._reroute_gen: torch.Generator | None = None
        self.record: Tensor | None = None  # [layers, B, Lp + T, k] int16, −1 = not recorded
        self.recording = False
        self.updates = 0

    def start(self, batch: RolloutBatch) -> None:
        """Begin a rollout: the forwards until :meth:`begin_updates` record its routing at θ_old."""
        B, Lp = batch.prompt_ids.shape
        T = batch.response_ids.shape[1]
        n, k = self.hooks.num_layers, self.hooks.top_k
        self.record = torch.full((n, B, Lp + T, k), -1, dtype=torch.int16)
        self.recording, self.updates = True, 0
        self._changed = torch.zeros(n, dtype=torch.float64)  # Σ set changed, per layer
        self._expert_change = torch.zeros(n, dtype=torch.float64)  # Σ |E_new \ E_old| / k
        self._pairs = torch.zeros((), dtype=torch.float64)  # response tokens compared (per layer)
        self._positions = torch.zeros(B, Lp + T, dtype=torch.bool)  # recorded scoring positions

    def begin_updates(self, generator: torch.Generator | None = None) -> None:
        """The recording is complete; the forwards that follow are the updates' forwards.

        With ``reroute_frac`` the re-routed pairs are drawn from a stream seeded from
        ``generator``'s seed (the update's, so runs stay exact), which it does not consume.
        """
        self.recording = False
        if self.reroute_frac > 0:
            seed = 0 if generator is None else generator.initial_seed()
            self._reroute_gen = torch.Generator().manual_seed((seed * 31 + 17) % 2**63)

    def optimizer_stepped(self) -> None:
        """One optimizer step taken: the forwards that follow are off-policy (θ ≠ θ_old)."""
        self.updates += 1

    @contextmanager
    def forward(self, batch: RolloutBatch, rows: Tensor, joint_width: int, resp_mask: Tensor):
        """Wrap the one forward of ``rows`` (its [b, Lj] columns as :func:`joint_inputs` trims them)."""
        if self.record is None:
            raise RuntimeError("call start(batch) before the rollout's first forward")
        Lp_full = batch.prompt_ids.shape[1]
        T = resp_mask.shape[1]
        cols = torch.cat(
            [torch.arange(Lp_full - (joint_width - T), Lp_full), Lp_full + torch.arange(T)]
        )  # [Lj] column of each joint position in the batch layout
        where = (rows.cpu()[:, None], cols[None, :])
        recorded = self.record[:, where[0], where[1]].long()  # [layers, b, Lj, k]
        forced = None
        if self.replay and not self.recording:
            forced = [layer.reshape(-1, layer.shape[-1]) for layer in recorded]  # [b·Lj, k]
        reroute = None
        if self.reroute_frac > 0 and not self.recording and self.updates > 0:
            reroute = (self.reroute_frac, self._reroute_gen)
        with self.hooks.capture(forced, reroute):
            yield
        b = rows.numel()
        own = torch.stack([c.view(b, joint_width, -1).cpu() for c in self.hooks.captured])
        positions = scoring_positions(joint_width, resp_mask.cpu())  # [b, Lj]
        if self.recording:
            self.record[:, where[0], where[1]] = own.to(torch.int16)
            self._positions[where[0], where[1]] |= positions
        elif self.updates > 0:
            self._changed += C.routing_set_changed(recorded[:, positions], own[:, positions]).sum(1)
            self._expert_change += C.routing_expert_change(
                recorded[:, positions], own[:, positions]
            ).sum(1)
            self._pairs += positions.sum()

    def metrics(self) -> dict[str, Tensor]:
        """This rollout's routing metrics (churn only if an off-policy forward was compared)."""
        out: dict[str, Tensor] = {}
        if self.record is None:
            return out
        if self._pairs > 0:
            per_layer = self._changed / self._pairs  # [layers]
            out["moe/routing_churn"] = per_layer.mean()
            out["moe/expert_change"] = (self._expert_change / self._pairs).mean()
            for i, value in enumerate(per_layer):
                out[f"moe/routing_churn/layer_{i}"] = value
        if self._positions.any():
            E = self.hooks.num_experts
            loads = torch.stack(
                [C.expert_load(layer, self._positions, E) for layer in self.record]
            )  # [layers, E]
            out["moe/load_cv"] = C.load_cv(loads).mean()
            out["moe/load_max"] = (loads.max(dim=-1).values * E).mean()
        return out

    def remove(self) -> None:
        self.hooks.remove()
