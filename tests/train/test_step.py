"""The RL step on a real (nano) Hugging Face model, in float64 so identities hold to ~1e-12."""

import copy

import pytest
import torch

import seqrl.core as C
from seqrl.models import load_policy
from seqrl.rollout import HFSampler, response_mask_from_tokens
from seqrl.tasks import get_task
from seqrl.train.step import UpdateSettings, batch_logprobs, update_policy


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = load_policy("builtin:nano")
    model = model.double()
    task = get_task("addition", digits=2, seed=1)
    prompts = [e.prompt for e in task.examples("train", 4)] + ["1+2="]  # ragged prompt lengths
    sampler = HFSampler(model, tok, max_new_tokens=7, temperature=1.0)
    batch = sampler.generate(prompts, group_size=4)
    return model, tok, batch


def test_response_mask_ends_at_the_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    mask, truncated = response_mask_from_tokens(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_recomputed_logprobs_match_the_samplers(setup):
    model, _, batch = setup
    assert batch.response_mask.sum(-1).min() >= 1 and batch.prompt_mask.sum(-1).unique().numel() > 1
    recomputed = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=3)
    torch.testing.assert_close(recomputed, batch.sampler_logprobs.double(), rtol=0, atol=1e-5)
    assert (recomputed[~batch.response_mask] == 0).all()


@pytest.mark.parametrize("name", ["gspo", "dapo", "grpo", "dr_grpo", "fipo"])
def test_micro_batch_size_does_not_change_the_update(setup, name):
    model, _, batch = setup
    B = batch.response_ids.shape[0]
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 2, (B,), generator=gen).double()
    adv = C.group_advantages(rewards, 4)
    old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=B)
    old = old + 0.3 * torch.randn(old.shape, generator=gen, dtype=old.dtype) * batch.response_mask
    overrides = {"grpo": {"kl_coef": 0.0}, "dr_grpo": {"max_tokens": 7}}.get(name, {})
    if name == "gspo":
        overrides = {"clip_low": 0.05, "clip_high": 0.05}
    results = []
    for micro in (B, 3):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        settings = UpdateSettings(
            name,
            overrides,
            num_minibatches=2,
            ppo_epochs=1,
            micro_batch_size=micro,
            grad_clip=1e9,
            temperature=1.0,
        )
        metrics, skipped = update_policy(
            m, opt, batch, adv, old, None, settings, torch.Generator().manual_seed(7)
        )
        assert skipped == 0
        results.append((torch.nn.utils.parameters_to_vector(m.parameters()).detach(), metrics))
    (full, m_full), (split, _) = results
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert not torch.equal(full, start)
    torch.testing.assert_close(split, full, rtol=1e-10, atol=1e-12)
    if name == "fipo":
        assert (
            m_full["fipo/dropped_seqs"] >= 0
        )  # the drop rule path ran (exact via sum-then-divide)


@pytest.mark.parametrize("name", ["grpo", "fipo"])
def test_logged_losses_do_not_depend_on_micro_batch_size(setup, name):
    """loss/policy and loss/kl are the minibatch's losses (the micro-batch shares summed), so
    the micro-batch size changes neither the update nor what is logged about it."""
    model, _, batch = setup
    B = batch.response_ids.shape[0]
    gen = torch.Generator().manual_seed(5)
    adv = C.group_advantages(torch.randint(0, 2, (B,), generator=gen).double(), 4)
    old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=B)
    ref = old - 0.1 * batch.response_mask  # a reference away from π_old: a non-zero KL
    logged = []
    for micro in (B, 3):
        settings = UpdateSettings(name, {}, 2, 1, micro, 1e9, 1.0)
        m = copy.deepcopy(model)
        metrics, _ = update_policy(
            m,
            torch.optim.SGD(m.parameters(), lr=0.0),
            batch,
            adv,
            old,
            ref,
            settings,
            torch.Generator().manual_seed(7),
        )
        logged.append(metrics)
    for key in ("loss/policy", "loss/kl"):
        assert logged[0][key] != 0
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-9, abs=1e-12), key


def test_single_on_policy_update_needs_no_old_logprob_pass(setup):
    model, _, batch = setup
    B = batch.response_ids.shape[0]
    adv = C.group_advantages(torch.arange(B, dtype=torch.float64) % 3, 4)
    settings = UpdateSettings(
        "dapo",
        {},
        num_minibatches=1,
        ppo_epochs=1,
        micro_batch_size=6,
        grad_clip=1e9,
        temperature=1.0,
    )
    params = []
    for old in (batch_logprobs(model, batch, temperature=1.0, micro_batch_size=B), None):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        metrics, _ = update_policy(
            m, opt, batch, adv, old, None, settings, torch.Generator().manual_seed(1)
        )
        assert metrics["policy/ratio_max"] == pytest.approx(1.0, abs=1e-12)
        params.append(torch.nn.utils.parameters_to_vector(m.parameters()).detach())
    torch.testing.assert_close(params[1], params[0], rtol=1e-10, atol=1e-12)
    several = UpdateSettings(
        "dapo",
        {},
        num_minibatches=2,
        ppo_epochs=1,
        micro_batch_size=6,
        grad_clip=1e9,
        temperature=1.0,
    )
    with pytest.raises(ValueError, match="single on-policy update"):
        update_policy(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            batch,
            adv,
            None,
            None,
            several,
            torch.Generator(),
        )
