"""algo.shared_prefix: one prompt forward per group equals the joint forward, values and gradients."""

import copy

import pytest
import torch

from seqrl.config import load_config
from seqrl.models import load_policy
from seqrl.rollout import HFSampler
from seqrl.tasks import get_task
from seqrl.train.forward import shared_prefix_logits
from seqrl.train.step import UpdateSettings, batch_logprobs, response_logprobs, update_policy
from seqrl.train.trainer import Trainer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = load_policy("builtin:nano")
    model = model.double()
    task = get_task("addition", digits=2, seed=1)
    prompts = [e.prompt for e in task.examples("train", 4)] + ["1+2="]  # ragged prompt lengths
    batch = HFSampler(model, tok, max_new_tokens=7).generate(prompts, group_size=4)
    assert batch.response_mask.sum(-1).unique().numel() > 1  # ragged responses too
    return model, batch


def _logprobs_and_grads(model, batch, rows, shared_prefix):
    model = copy.deepcopy(model).train()
    logprobs, entropy = response_logprobs(
        model, batch, rows, temperature=0.8, with_entropy=True, shared_prefix=shared_prefix
    )
    (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
    return logprobs.detach(), entropy, [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "rows",
    [torch.arange(20), torch.tensor([13, 2, 7, 0, 19, 3, 12, 1]), torch.tensor([4, 5, 16, 17])],
)
def test_shared_prompt_forward_equals_the_joint_forward(setup, rows, float64_norms):
    model, batch = setup
    assert shared_prefix_logits(model, batch, rows) is not None  # the shared path really runs
    ref = _logprobs_and_grads(model, batch, rows, shared_prefix=False)
    shared = _logprobs_and_grads(model, batch, rows, shared_prefix=True)
    torch.testing.assert_close(shared[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(shared[1], ref[1], rtol=0, atol=1e-12)
    for got, want in zip(shared[2], ref[2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_nothing_shared_falls_back_to_the_joint_forward(setup):
    model, batch = setup
    assert shared_prefix_logits(model, batch, torch.tensor([0, 4, 8, 12])) is None  # one per group
    one_per_group = type(batch)(**{**batch.__dict__, "group_size": 1})
    assert shared_prefix_logits(model, one_per_group, torch.arange(8)) is None
    mixed = type(batch)(**{**batch.__dict__, "group_size": 8})  # rows 0-7 hold two prompts
    assert shared_prefix_logits(model, mixed, torch.arange(8)) is None


def test_update_and_old_logprobs_match_the_reference_path(setup, float64_norms):
    model, batch = setup
    old = {
        flag: batch_logprobs(model, batch, temperature=1.0, micro_batch_size=6, shared_prefix=flag)
        for flag in (False, True)
    }
    torch.testing.assert_close(old[True], old[False], rtol=0, atol=1e-12)
    params = {}
    for flag in (False, True):
        policy = copy.deepcopy(model)
        settings = UpdateSettings("gspo", {}, 2, 1, 5, 1.0, 1.0, shared_prefix=flag)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        advantages = torch.linspace(-1, 1, 20, dtype=torch.float64)
        _, skipped = update_policy(
            policy, optimizer, batch, advantages, old[False], None, settings,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert skipped == 0
        params[flag] = [p.detach() for p in policy.parameters()]
    for got, want in zip(params[True], params[False], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_trainer_runs_with_the_fast_paths(fast_overrides):
    overrides = [*fast_overrides, "rollout.engine=fast", "algo.shared_prefix=true"]
    trainer = Trainer(load_config(None, overrides), progress=False)
    assert type(trainer.sampler).__name__ == "FastSampler"
    assert trainer.update_settings.shared_prefix
    metrics = trainer.train_step(1)
    assert metrics["time/step_s"] > 0 and "policy/clip_frac" in metrics
