"""Routing capture and Routing Replay for Hugging Face mixture-of-experts models, by forward hooks.

In transformers ≥ 5 every supported MoE block asks one router module for its experts::

    router_logits, top_k_weights, top_k_index = self.gate(hidden_states)   # [N, E], [N, k], [N, k]
    out = self.experts(hidden_states, top_k_index, top_k_weights)

where N = tokens of the forward (batch × length, flattened) and E = experts. A forward hook on the
router sees that output, so no modelling code is copied or patched:

- **capture** keeps ``top_k_index`` (the router's own choice) of every router, layer by layer;
- **replay** replaces ``(top_k_weights, top_k_index)`` by the recorded experts and weights taken
  from the *current* router's probabilities at those experts, normalised as the architecture does:

      p = softmax(router_logits)          # [N, E], float32, the router's own softmax
      w = p[recorded]                      # [N, k]
      w = w / Σ w   (only where the architecture renormalises its top-k: ``norm_topk_prob`` / Mixtral)

  ``router_logits`` carry the graph, so the router weights get gradient through ``w``, and the
  experts that are used get gradient as usual. ``router_logits`` themselves (what the auxiliary
  load-balancing loss reads) are left unchanged. When the recorded experts equal the router's own
  choice, replay returns the router's own weights, so a replayed forward at θ_old is the plain one.
  (Masking the logits to −∞ outside the recorded set would give the same experts, but weights
  renormalised over the k experts: wrong for ``norm_topk_prob=False``, e.g. Qwen2-MoE's default.)

A recorded index of −1 means "not recorded: keep the router's own choice for this token" (padding
columns that a forward includes but the recording forward did not).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

ROUTER_CLASSES: dict[str, str] = {
    "Qwen2MoeTopKRouter": "norm_topk_prob",
    "Qwen3MoeTopKRouter": "norm_topk_prob",
    "OlmoeTopKRouter": "norm_topk_prob",
    "MixtralTopKRouter": "always",
}
"""Supported router classes (softmax over all experts, then top-k) → when the top-k weights are
renormalised: ``"always"`` or the name of the router's boolean attribute that says so."""


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The supported router modules of ``model``, in layer order (empty for a dense model)."""
    return [m for m in model.modules() if type(m).__name__ in ROUTER_CLASSES]


def is_moe(model: nn.Module) -> bool:
    """Whether ``model`` has at least one supported MoE router."""
    return bool(find_routers(model))


def _renormalises(router: nn.Module) -> bool:
    rule = ROUTER_CLASSES[type(router).__name__]
    return True if rule == "always" else bool(getattr(router, rule))


def replay_weights(router_logits: Tensor, indices: Tensor, renormalise: bool) -> Tensor:
    """Routing weights of the experts ``indices`` [N, k] under the router's logits [N, E]: [N, k] float32.

    w = softmax(logits)[indices], divided by its sum over k when ``renormalise``.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [N, E]
    weights = probs.gather(-1, indices)  # [N, k]
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def reroute(
    router_logits: Tensor, indices: Tensor, frac: float, generator: torch.Generator
) -> Tensor:
    """Controlled routing churn: ``indices`` [N, k] with a random share ``frac`` of rows re-routed.

    A re-routed row trades its weakest expert (the last of the router's sorted top-k) for the
    runner-up, the (k + 1)-th by router logit [N, E]: the swap a small change of the router's
    weights makes first, so a re-routed set differs in one expert (|E_new \\ E_old| / k = 1/k),
    as the churn measured after real updates mostly does. Which rows is drawn from ``generator``
    (CPU). The testbed knob ``moe.reroute_frac``; see docs/benchmarks.md.
    """
    N, k = indices.shape
    chosen = (torch.rand(N, generator=generator) < frac).to(indices.device)  # [N]
    runner_up = router_logits.detach().topk(k + 1, dim=-1).indices[:, k]  # [N]
    out = indices.clone()
    out[:, k - 1] = torch.where(chosen, runner_up.to(indices.dtype), indices[:, k - 1])
    return out


class RouterHooks:
    """Forward hooks on every router of an MoE model: capture its choices, or replay recorded ones.

    Idle (output untouched, nothing stored) outside :meth:`capture`. Inside ``capture(forced)``,
    every router call appends its own top-k indices [N, k] to :attr:`captured` (one entry per
    layer, in call order), and, when ``forced`` is given (one [N, k] long tensor per layer, −1 =
    keep own choice), routes each token to the forced experts instead. With ``reroute=(frac,
    generator)`` the router's own choice is first re-routed by :func:`reroute` (and captured so).
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(
                f"{type(model).__name__} has no supported MoE router (supported router classes: "
                f"{', '.join(ROUTER_CLASSES)}); routing capture and replay need an MoE policy "
                "such as builtin:tiny-moe"
            )
        self.top_k = int(self.routers[0].top_k)
        self.num_experts = int(self.routers[0].num_experts)
        self.captured: list[Tensor] = []
        self._active = False
        self._forced: list[Tensor] | None = None
        self._reroute: tuple[float, torch.Generator] | None = None
        self._handles = [
            router.register_forward_hook(self._make_hook(layer, _renormalises(router)))
            for layer, router in enumerate(self.routers)
        ]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def _make_hook(self, layer: int, renormalise: bool):
        def hook(module, args, output):
            if not self._active:
                return None
            router_logits, weights, indices = output  # [N, E], [N, k], [N, k]
            if layer != len(self.captured):
                raise RuntimeError(
                    f"router {layer} called out of order (expected {len(self.captured)}): one "
                    "capture() must wrap exactly one forward pass"
                )
            own = indices
            if self._reroute is not None:
                own = reroute(router_logits, indices, *self._reroute)
            self.captured.append(own.detach())
            if self._forced is None:
                if own is indices:
                    return None
                forced = own
            else:
                forced = self._forced[layer].to(indices.device)  # [N, k]
                if forced.shape != indices.shape:
                    raise ValueError(
                        f"replayed routing of layer {layer} has shape {tuple(forced.shape)}, the "
                        f"forward routes {tuple(indices.shape)}: record and replay the same tokens"
                    )
                forced = torch.where(forced < 0, own, forced)  # −1: keep the router's own choice
            new_weights = replay_weights(router_logits, forced, renormalise).to(weights.dtype)
            return router_logits, new_weights, forced

        return hook

    @contextmanager
    def capture(
        self,
        forced: list[Tensor] | None = None,
        reroute: tuple[float, torch.Generator] | None = None,
    ):
        """Capture (and, with ``forced``, replay) the routing of the one forward pass inside."""
        if forced is not None and len(forced) != self.num_layers:
            raise ValueError(
                f"forced routing has {len(forced)} layers, model has {self.num_layers}"
            )
        self.captured, self._forced, self._reroute, self._active = [], forced, reroute, True
        try:
            yield self
        finally:
            self._active, self._forced, self._reroute = False, None, None

    def remove(self) -> None:
        """Detach the hooks; the model routes as if they had never been there."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
