"""algo.packing and algo.max_tokens_per_micro_batch: padding-free forwards and token-budget
micro-batches equal the padded reference, values and gradients, for every loss and both critics."""

import copy
import itertools

import pytest
import torch

import seqrl.train.forward as F
from seqrl.config import load_config
from seqrl.models import load_policy
from seqrl.models.critic import build_critic
from seqrl.models.load import checkpointing_active, enable_gradient_checkpointing
from seqrl.rollout import FastSampler, HFSampler
from seqrl.train.critic import Critic, CriticSettings
from seqrl.train.forward import (
    batch_logprobs,
    batch_values,
    forward_layout,
    micro_batches,
    pack,
    pack_rows,
    packing_support,
    response_logprobs,
    row_tokens,
)
from seqrl.train.step import UpdateSettings, update_policy
from seqrl.train.trainer import Trainer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = load_policy("builtin:nano")
    model = model.double()
    prompts = ["12+34=", "1+2=", "7=", "123+4567=", "55+66="]  # ragged prompt lengths
    batch = HFSampler(model, tok, max_new_tokens=24).generate(prompts, group_size=4)
    lengths = batch.response_mask.sum(-1)
    assert lengths.max() >= 4 * lengths.min()  # responses of very different lengths
    return model, tok, batch


@pytest.fixture
def packs(monkeypatch):
    """Counts the packed forwards that really run."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return pack(*args, **kwargs)

    monkeypatch.setattr(F, "pack", counting)
    return calls


def test_pack_rows_is_first_fit_decreasing():
    lengths = [7, 3, 9, 2, 5, 9, 1]
    row, offset, n = pack_rows(lengths, 9)
    assert n == 4 == sum(lengths) // 9  # 9 | 9 | 7 + 2 | 5 + 3 + 1: no room wasted
    for r in range(n):  # sequences of a row are disjoint and fit
        spans = sorted((offset[i], offset[i] + lengths[i]) for i in range(7) if row[i] == r)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert spans[-1][1] <= 9


def test_pack_lays_sequences_end_to_end_and_maps_outputs_back():
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [0, 8, 9, 1, 2, 3], [0, 0, 0, 4, 0, 0]])
    real = ids != 0
    keep = real.clone()
    packed = pack(ids, real, keep)
    assert packed.input_ids.shape == (2, 5)  # [8 9 1 2 3] and [5 6 7 4 filler]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    outputs = packed.input_ids[packed.keep][packed.order]  # an identity "model"
    assert torch.equal(outputs, ids[keep])


@pytest.mark.parametrize("rows", [torch.arange(20), torch.tensor([13, 2, 7, 0, 19, 3, 12, 1])])
def test_packed_forward_equals_the_joint_forward(setup, rows, float64_norms, packs):
    model, _, batch = setup
    assert forward_layout(model, batch, rows, shared_prefix=False, packing=True) == "packed"
    out = {}
    for packing in (False, True):
        policy = copy.deepcopy(model).train()
        logprobs, entropy = response_logprobs(
            policy, batch, rows, temperature=0.8, with_entropy=True, packing=packing
        )
        weights = torch.linspace(-1, 1, logprobs.numel(), dtype=logprobs.dtype)
        (logprobs * weights.view_as(logprobs)).sum().backward()
        out[packing] = (logprobs.detach(), entropy, [p.grad for p in policy.parameters()])
    assert len(packs) == 1
    mask = batch.response_mask[rows]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[True][1][mask], out[False][1][mask], rtol=0, atol=1e-12)
    for got, want in zip(out[True][2], out[False][2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_packed_float32_logprobs_match_on_the_trained_model(packs):
    model, tok = load_policy("builtin:tiny-addition")
    prompts = ["12+345=", "1+2=", "999+1=", "40+40="]
    torch.manual_seed(0)
    batch = FastSampler(model, tok, max_new_tokens=8).generate(prompts, group_size=3)
    rows = torch.arange(12)
    with torch.no_grad():
        joint = response_logprobs(model, batch, rows, temperature=1.0)[0]
        packed = response_logprobs(model, batch, rows, temperature=1.0, packing=True)[0]
    assert packs
    torch.testing.assert_close(packed, joint, rtol=0, atol=2e-5)
    torch.testing.assert_close(packed, batch.sampler_logprobs, rtol=0, atol=2e-5)


LOSSES = {
    "ppo": {},
    "grpo": {},
    "dapo": {},
    "dr_grpo": {"max_tokens": 24},
    "gspo": {},
    "gspo_token": {},
    "sppo": {},
    "fipo": {},
    "rloo": {},
    "remax": {},
}


def _update(model, batch, settings, advantages, old, ref=None):
    policy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    metrics, skipped = update_policy(
        policy, optimizer, batch, advantages, old, ref, settings, torch.Generator().manual_seed(0)
    )
    assert skipped == 0
    return [p.detach() for p in policy.parameters()], metrics


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_updates_the_same_with_packing(setup, name, float64_norms, packs):
    model, _, batch = setup
    B, T = batch.response_ids.shape
    if name == "ppo":  # token-level advantages, as GAE gives
        advantages = torch.linspace(-1, 1, B * T, dtype=torch.float64).view(B, T)
    else:
        advantages = torch.linspace(-1, 1, B, dtype=torch.float64)
    old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=6)
    ref = old - 0.01 * batch.response_mask  # a KL term that is not zero
    overrides = LOSSES[name] | {"kl_coef": 0.05}
    params, metrics = {}, {}
    for packing in (False, True):
        # two minibatches: the second is off-policy (ratios ≠ 1, FIPO weights ≠ 1)
        settings = UpdateSettings(name, overrides, 2, 1, 5, 1.0, 1.0, packing=packing)
        params[packing], metrics[packing] = _update(model, batch, settings, advantages, old, ref)
    assert packs  # the packed layout really ran
    for got, want in zip(params[True], params[False], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for key in ("loss/policy", "policy/clip_frac", "policy/entropy"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], abs=1e-12)


def test_micro_batches_by_token_budget():
    tokens = torch.tensor([5, 30, 12, 12, 40, 3, 25])
    rows = torch.tensor([6, 0, 2, 4, 1])
    micros = micro_batches(rows, tokens, max_rows=2, max_tokens=40)
    assert [m.tolist() for m in micros] == [[4], [1], [6, 2], [0]]  # longest first, ≤ 40 each
    assert micro_batches(rows, tokens, max_rows=2, max_tokens=None)[0].tolist() == [6, 0]
    assert micro_batches(rows[:0], tokens, max_rows=2, max_tokens=None) == []  # nothing to run


@pytest.mark.parametrize("name", ["gspo", "fipo", "dr_grpo"])
@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_micro_batches_do_not_change_the_update(setup, name, packing, float64_norms):
    model, _, batch = setup
    advantages = torch.linspace(-1, 1, batch.response_ids.shape[0], dtype=torch.float64)
    old = {
        budget: batch_logprobs(
            model, batch, temperature=1.0, micro_batch_size=6, max_tokens=budget, packing=packing
        )
        for budget in (None, 50)
    }
    torch.testing.assert_close(old[50], old[None], rtol=0, atol=1e-12)
    params = {}
    for budget in (None, 50):
        settings = UpdateSettings(
            name, LOSSES[name], 2, 1, 64, 1.0, 1.0, packing=packing,
            max_tokens_per_micro_batch=budget,
        )  # fmt: skip
        params[budget] = _update(model, batch, settings, advantages, old[None])[0]
    for got, want in zip(params[50], params[None], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kind, token_loss", [("scalar", "mse"), ("token", "mse"), ("token", "bce")]
)
def test_critics_pack_to_the_same_values_and_update(setup, kind, token_loss, float64_norms, packs):
    model, tok, batch = setup
    B = batch.response_ids.shape[0]
    rewards = (torch.arange(B) % 3 == 0).double()
    out = {}
    for packing in (False, True):
        critic_model = build_critic("builtin:nano", model, tok, seed=1).double()
        settings = CriticSettings(
            kind, 2, 1, 5, 1.0, token_loss=token_loss, packing=packing, max_tokens=None
        )
        optimizer = torch.optim.SGD(critic_model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        critic = Critic(critic_model, optimizer, scheduler, settings)
        values = critic.values(batch)
        advantages, targets = critic.advantages(batch, rewards, values)
        critic.update(batch, targets, values, torch.Generator().manual_seed(0))
        out[packing] = (values, advantages, [p.detach() for p in critic_model.parameters()])
    assert packs
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-12)
    for got, want in zip(out[True][2], out[False][2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_batch_values_keep_row_order_under_a_token_budget(setup):
    model, tok, batch = setup
    critic = build_critic("builtin:nano", model, tok, seed=1).double()
    for kind in ("scalar", "token"):
        rows = batch_values(critic, batch, kind, 64)
        budget = batch_values(critic, batch, kind, 64, packing=True, max_tokens=40)
        torch.testing.assert_close(budget, rows, rtol=0, atol=1e-12)
    assert (
        row_tokens(batch).tolist()
        == (batch.prompt_mask.sum(-1) + batch.response_mask.sum(-1)).tolist()
    )


def test_a_model_that_cannot_pack_runs_padded_and_says_so(setup):
    model, _, batch = setup
    own_mask = copy.deepcopy(model)  # builds its own full mask: packed sequences would mix
    forward = type(own_mask).forward

    def with_mask(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    own_mask.forward = with_mask.__get__(own_mask)
    with pytest.warns(UserWarning, match="packed sequences attend to each other"):
        support = packing_support(own_mask)
    assert not support.exact
    rows = torch.arange(20)
    assert forward_layout(own_mask, batch, rows, shared_prefix=False, packing=True) == "joint"
    with torch.no_grad():
        got = response_logprobs(own_mask, batch, rows, temperature=1.0, packing=True)[0]
        want = response_logprobs(model, batch, rows, temperature=1.0)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert packing_support(model).exact and packing_support(model).logits_mask


def test_layout_choice_prefers_the_fewest_positions(setup):
    model, _, batch = setup
    full = torch.arange(20)
    assert forward_layout(model, batch, full, shared_prefix=False, packing=False) == "joint"
    assert forward_layout(model, batch, full, shared_prefix=True, packing=False) == "shared"
    same_length = batch.response_mask.sum(-1) == batch.response_mask.sum(-1).max()
    one = same_length.nonzero()[:2, 0]
    if batch.prompt_mask[one].sum(-1).unique().numel() == 1:  # nothing to save: stays joint
        assert forward_layout(model, batch, one, shared_prefix=False, packing=True) == "joint"


def test_gradient_checkpointing_turns_the_shared_prefix_off_and_changes_no_gradient():
    """Checkpointed layers keep no KV cache in a training forward, so the shared prefix cannot
    run there: the forward takes the packed layout instead, with the same gradients."""
    model, tok = load_policy("builtin:tiny-addition")
    torch.manual_seed(0)
    batch = FastSampler(model, tok, max_new_tokens=6).generate(["12+34=", "5+9="], group_size=4)
    advantages = torch.linspace(-1, 1, 8)

    def grads(checkpointing: bool, shared_prefix: bool) -> list:
        policy = copy.deepcopy(model)
        if checkpointing:
            enable_gradient_checkpointing(policy)
        settings = UpdateSettings(
            "grpo", {"kl_coef": 0.0}, 1, 1, 8, None, 1.0, shared_prefix=shared_prefix,
            packing=True,
        )  # fmt: skip
        optimizer, out = torch.optim.SGD(policy.parameters(), lr=0.0), {}
        optimizer.step = lambda: out.update(grads=[q.grad.clone() for q in policy.parameters()])
        with checkpointing_active(policy):
            update_policy(policy, optimizer, batch, advantages, None, None, settings, None)
        return out["grads"]

    for got, want in zip(grads(True, True), grads(False, False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_defaults_are_the_fast_paths_and_the_reference_stays_selectable(fast_overrides):
    cfg = load_config(None, [])
    assert cfg.rollout.engine == "fast" and cfg.algo.shared_prefix and cfg.algo.packing
    assert cfg.algo.max_tokens_per_micro_batch is None
    reference = [
        *fast_overrides,
        "rollout.engine=hf",
        "algo.shared_prefix=false",
        "algo.packing=false",
    ]
    trainer = Trainer(load_config(None, reference), progress=False)
    assert type(trainer.sampler) is HFSampler
    s = trainer.update_settings
    assert not s.shared_prefix and not s.packing and s.max_tokens_per_micro_batch is None


def test_trainer_runs_with_a_token_budget_and_packing(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "algo.max_tokens_per_micro_batch=40"])
    trainer = Trainer(cfg, progress=False)
    assert type(trainer.sampler) is FastSampler
    metrics = trainer.train_step(1)
    assert metrics["time/step_s"] > 0 and "policy/clip_frac" in metrics


def test_moe_policies_fall_back_to_the_padded_layout_by_themselves(fast_overrides):
    overrides = [*fast_overrides, "model.policy=builtin:tiny-moe", "moe.routing_replay=true"]
    trainer = Trainer(load_config(None, overrides), progress=False)
    assert trainer.update_settings.shared_prefix and trainer.update_settings.packing
    metrics = trainer.train_step(1)
    assert "moe/routing_churn" in metrics
    # the model itself packs exactly (a reference model or a run without the record may pack):
    # its grouped expert matmuls only round differently
    assert packing_support(trainer.model).exact
