"""Routing capture and Routing Replay hooks on real transformers MoE models; routing statistics."""

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

import seqrl.core as C
from reference import ref_routing_churn
from seqrl.models import build_tiny_model, build_tokenizer, load_policy
from seqrl.models.moe import ROUTER_CLASSES, RouterHooks, find_routers, is_moe, reroute
from seqrl.models.tiny import build_tiny_moe_model
from support import ExpertsObserver

_SMALL = dict(
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)


def _qwen3(norm=True):
    model = build_tiny_moe_model(build_tokenizer(), norm_topk_prob=norm)
    return model.float().eval()


def _build(name: str):
    torch.manual_seed(0)
    if name == "qwen3_moe":
        return _qwen3(True)
    if name == "qwen2_moe":  # norm_topk_prob=False: weights are the full-softmax probabilities
        cfg = Qwen2MoeConfig(
            **_SMALL,
            num_experts=6,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            norm_topk_prob=False,
        )
        return Qwen2MoeForCausalLM(cfg).eval()
    if name == "mixtral":
        return MixtralForCausalLM(
            MixtralConfig(**_SMALL, num_local_experts=6, intermediate_size=16)
        ).eval()
    if name == "olmoe":
        return OlmoeForCausalLM(OlmoeConfig(**_SMALL, num_experts=6, intermediate_size=16)).eval()
    raise AssertionError(name)


ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def _inputs(vocab: int, b: int = 3, L: int = 9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (b, L), generator=gen)
    attention = torch.ones(b, L, dtype=torch.long)
    attention[0, :3] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": attention}


def _perturb_routers(model, scale=2.0, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in find_routers(model):
            router.weight.add_(scale * torch.randn(router.weight.shape, generator=gen))


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_find_every_router_in_layer_order(arch):
    model = _build(arch)
    routers = find_routers(model)
    assert len(routers) == model.config.num_hidden_layers and is_moe(model)
    assert all(type(r).__name__ in ROUTER_CLASSES for r in routers)
    names = [n for n, m in model.named_modules() if m in routers]
    assert names == sorted(names, key=lambda n: int(n.split(".")[2]))  # model.layers.<i>....


@pytest.mark.parametrize("arch", ARCHS)
def test_idle_hooks_and_plain_capture_leave_logits_bit_identical(arch):
    model = _build(arch)
    inputs = _inputs(model.config.vocab_size)
    with torch.no_grad():
        plain = model(**inputs).logits
        hooks = RouterHooks(model)
        idle = model(**inputs).logits
        with hooks.capture():
            captured = model(**inputs).logits
    assert torch.equal(plain, idle) and torch.equal(plain, captured)
    assert len(hooks.captured) == model.config.num_hidden_layers
    assert hooks.captured[0].shape == (3 * 9, 2)
    hooks.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_replaying_the_models_own_routing_is_the_plain_forward(arch):
    """Replayed weights = the architecture's own top-k weights (its normalisation, its dtype)."""
    model = _build(arch)
    inputs = _inputs(model.config.vocab_size)
    hooks = RouterHooks(model)
    with torch.no_grad(), hooks.capture():
        plain = model(**inputs).logits
    recorded = hooks.captured
    with torch.no_grad(), hooks.capture(forced=recorded):
        replayed = model(**inputs).logits
    assert torch.equal(plain, replayed)


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_forces_the_recorded_experts_after_a_parameter_change(arch):
    model = _build(arch)
    inputs = _inputs(model.config.vocab_size)
    hooks = RouterHooks(model)
    with torch.no_grad(), hooks.capture():
        model(**inputs)
    recorded = [r.clone() for r in hooks.captured]
    _perturb_routers(model)
    observer = ExpertsObserver(model)
    with torch.no_grad(), hooks.capture(forced=recorded):
        model(**inputs)
    own = hooks.captured  # what the perturbed routers would have chosen
    assert any(C.routing_set_changed(r, o).any() for r, o in zip(recorded, own, strict=True))
    assert len(observer.seen) == len(recorded)
    for used, rec in zip(observer.seen, recorded, strict=True):
        assert torch.equal(used, rec)
    observer.seen.clear()
    with torch.no_grad():  # outside capture(): the perturbed model routes by itself again
        model(**inputs)
    assert any(not torch.equal(u, r) for u, r in zip(observer.seen, recorded, strict=True))
    observer.remove()


def test_replay_keeps_the_routers_own_choice_where_nothing_was_recorded():
    model = _build("qwen3_moe")
    inputs = _inputs(model.config.vocab_size)
    hooks = RouterHooks(model)
    with torch.no_grad(), hooks.capture():
        model(**inputs)
    recorded = [r.clone() for r in hooks.captured]
    _perturb_routers(model)
    forced = [r.clone() for r in recorded]
    for f in forced:
        f[:5] = -1
    observer = ExpertsObserver(model)
    with torch.no_grad(), hooks.capture(forced=forced):
        model(**inputs)
    for used, own, rec in zip(observer.seen, hooks.captured, recorded, strict=True):
        assert torch.equal(used[:5], own[:5]) and torch.equal(used[5:], rec[5:])


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_gradients_flow_to_routers_and_used_experts_under_replay(arch):
    """Replaying the own routing gives the plain gradient; a forced routing still trains routers."""
    model = _build(arch).train()
    inputs = _inputs(model.config.vocab_size)
    hooks = RouterHooks(model)

    def grads(forced=None):
        model.zero_grad()
        with hooks.capture(forced=forced):
            model(**inputs).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    own = [c.clone() for c in hooks.captured]
    replayed = grads(own)
    assert plain.keys() == replayed.keys()
    for name in plain:
        torch.testing.assert_close(replayed[name], plain[name], rtol=0, atol=0)
    _perturb_routers(model)
    forced = grads(own)
    router_names = [n for n, m in model.named_modules() if m in find_routers(model)]
    for name in router_names:
        g = forced[f"{name}.weight"]
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_replay_weights_match_a_masked_softmax_when_the_architecture_renormalises():
    """With norm_topk_prob, softmax over the logits masked to the recorded set is the same weight."""
    from seqrl.models.moe import replay_weights

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen)
    idx = torch.stack([torch.randperm(5, generator=gen)[:2] for _ in range(7)])
    keep = torch.zeros(7, 5, dtype=torch.bool).scatter(1, idx, True)
    masked = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).gather(1, idx)
    torch.testing.assert_close(replay_weights(logits, idx, True), masked)
    unnorm = torch.softmax(logits, dim=-1).gather(1, idx)  # norm_topk_prob=False
    torch.testing.assert_close(replay_weights(logits, idx, False), unnorm)


def test_dense_model_is_refused_with_a_clear_error():
    model = build_tiny_model(build_tokenizer(), size="nano")
    assert not is_moe(model)
    with pytest.raises(ValueError, match="builtin:tiny-moe"):
        RouterHooks(model)


def test_builtin_tiny_moe():
    model, tok = load_policy("builtin:tiny-moe")
    again = build_tiny_moe_model(tok, seed=0)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 8
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True)
    )
    assert len(find_routers(model)) == 4
    shipped, _ = load_policy("builtin:tiny-moe-addition-noisy")
    assert type(shipped).__name__ == "Qwen3MoeForCausalLM" and len(find_routers(shipped)) == 4


# ----------------------------------------------------------------------- routing statistics


def test_churn_hand_worked():
    # token 0: {0,1} vs {1,0} → same set (order ignored); token 1: {0,1} vs {0,2} → half changed;
    # token 2: {2,3} vs {0,1} → all changed
    old = torch.tensor([[0, 1], [0, 1], [2, 3]])
    new = torch.tensor([[1, 0], [0, 2], [0, 1]])
    assert C.routing_set_changed(old, new).tolist() == [False, True, True]
    assert C.routing_expert_change(old, new).tolist() == [0.0, 0.5, 1.0]


def test_churn_matches_the_set_reference_on_random_routings():
    gen = torch.Generator().manual_seed(0)
    L, N, E, k = 3, 50, 6, 2

    def routing():
        return torch.stack(
            [
                torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
                for _ in range(L)
            ]
        )  # [L, N, k]

    old, new = routing(), routing()
    new[:, :10] = old[:, :10].flip(-1)  # same sets, other order
    valid = torch.rand(N, generator=gen) < 0.7
    changed, moved = ref_routing_churn(old.tolist(), new.tolist(), valid.tolist())
    got_changed = C.routing_set_changed(old[:, valid], new[:, valid]).float().mean(1)
    got_moved = C.routing_expert_change(old[:, valid], new[:, valid]).mean(1)
    torch.testing.assert_close(got_changed, torch.tensor(changed))
    torch.testing.assert_close(got_moved, torch.tensor(moved))


def test_expert_load_and_cv():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 3]])  # last row masked out
    mask = torch.tensor([True, True, True, False])
    load = C.expert_load(idx, mask, 4)
    torch.testing.assert_close(load, torch.tensor([3, 2, 1, 0]) / 6)
    # mean 0.25, deviations (0.25, 1/12, -1/12, -0.25): var = (1/16 + 1/144)·2/4 = 5/144
    torch.testing.assert_close(C.load_cv(load), torch.tensor(5 / 144).sqrt() / 0.25)
    assert C.load_cv(torch.full((4,), 0.25)) == 0


def test_reroute_trades_the_weakest_expert_for_the_runner_up_hand_worked():
    logits = torch.tensor([[0.1, 3.0, 2.0, 1.0], [5.0, -1.0, 0.0, 4.0], [0.0, 1.0, 3.0, 2.0]])
    own = logits.topk(2, dim=-1).indices  # [[1, 2], [0, 3], [2, 3]]
    everything = reroute(logits, own, 1.0, torch.Generator().manual_seed(0))
    assert everything.tolist() == [[1, 3], [0, 2], [2, 1]]  # runner-ups 3, 2, 1
    assert torch.equal(reroute(logits, own, 0.0, torch.Generator().manual_seed(0)), own)
    assert own.tolist() == [[1, 2], [0, 3], [2, 3]]  # the input is not modified


def test_reroute_changes_the_asked_share_of_rows_by_exactly_one_expert():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(20_000, 8, generator=gen)
    own = logits.topk(2, dim=-1).indices
    new = reroute(logits, own, 0.3, torch.Generator().manual_seed(1))
    changed = C.routing_set_changed(own, new).float()
    assert abs(changed.mean().item() - 0.3) < 0.01
    # a re-routed set differs in one of its two experts: |E_new \ E_old| / k = 1/2 there
    torch.testing.assert_close(C.routing_expert_change(own, new), changed / 2)
    again = reroute(logits, own, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(new, again)  # the generator decides which rows


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_rerouted_experts_are_the_ones_used_and_captured(arch):
    model = _build(arch)
    inputs = _inputs(model.config.vocab_size)
    hooks = RouterHooks(model)
    with torch.no_grad(), hooks.capture():
        plain = model(**inputs).logits
    own = [c.clone() for c in hooks.captured]
    observer = ExpertsObserver(model)
    with torch.no_grad(), hooks.capture(reroute=(0.5, torch.Generator().manual_seed(2))):
        moved = model(**inputs).logits
    for used, captured, before in zip(observer.seen, hooks.captured, own, strict=True):
        assert torch.equal(used, captured)  # the forward went through the re-routed experts
        share = C.routing_set_changed(before, captured).float().mean().item()
        assert 0.2 < share < 0.8  # about half of the 27 tokens of each layer
    assert not torch.allclose(plain, moved)
    observer.seen.clear()
    forced = [o.clone() for o in own]
    with torch.no_grad(), hooks.capture(forced, reroute=(0.5, torch.Generator().manual_seed(2))):
        replayed = model(**inputs).logits
    for used, rec in zip(observer.seen, own, strict=True):
        assert torch.equal(used, rec)  # under replay the recorded experts are used all the same
    assert torch.equal(plain, replayed)
    observer.remove()
    hooks.remove()
