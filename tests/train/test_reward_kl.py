"""The KL penalty in the reward (``reward.kl_coef``): RLOO, ReMax, PPO-GAE and SPPO forms.

The trainer's advantages are checked against :func:`seqrl.core.token_level_rewards`, the
independent per-token form r_t = −β·k1_t (+ the score at the last token), on real rollouts of a
policy whose reference is a different model, so the penalty is not zero.
"""

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C
from seqrl.config import load_config, validate_warnings
from seqrl.train.step import compute_advantages
from seqrl.train.trainer import Trainer

BETA = 0.05  # larger than the presets' 0.001, so the penalty visibly moves the advantages


def _trainer(tmp_path, preset: str, *overrides: str) -> Trainer:
    cfg = load_config(
        preset,
        [
            "model.reference=builtin:tiny-addition",  # π_ref ≠ π_old: a non-zero penalty
            f"reward.kl_coef={BETA}",
            "rollout.prompts_per_step=4",
            "task.eval_size=4",
            f"output_dir={tmp_path}",
            "name=run",
            *overrides,
        ],
    )
    return Trainer(cfg, progress=False)


def _step_inputs(trainer: Trainer):
    rollout = trainer.collect(1)
    batch = rollout.batch
    old, _ = trainer.old_logprobs(batch)
    if old is None:  # a single on-policy update: π_old is the policy before it
        old = trainer._logprobs(trainer.model, batch)
    ref = trainer.reference_logprobs(batch)
    return rollout, old, ref


def test_presets_put_the_sppo_papers_kl_in_the_reward_of_rloo_and_remax():
    for name in ("rloo", "remax"):
        cfg = load_config(name)
        assert (cfg.reward.kl_coef, cfg.reward.kl_estimator) == (0.001, "k1")
        assert cfg.resolved_loss().kl_coef == 0  # not in the loss
    assert load_config("rloo").rollout.group_size == 5
    for name in ("sppo", "ppo", "grpo", "gspo", "dapo"):
        assert load_config(name).reward.kl_coef == 0


def test_rloo_advantages_use_the_kl_penalised_sequence_reward(tmp_path):
    trainer = _trainer(tmp_path, "rloo")
    assert trainer.ref_model is not None  # built for the reward's KL alone
    rollout, old, ref = _step_inputs(trainer)
    mask = rollout.batch.response_mask
    penalty = trainer.reward_kl_penalty(rollout.batch, old, ref)  # [B, T]
    adv, metrics = trainer.advantages(1, rollout, penalty)
    token_rewards = C.token_level_rewards(
        rollout.rewards, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=BETA
    )  # [B, T]: −β·k1 per token, + the score at the last one
    expected = C.rloo_advantages(token_rewards.sum(-1), 5)  # verl: RLOO on Σ_t r_t
    assert_close(adv, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(adv, C.rloo_advantages(rollout.rewards, 5))  # the KL moved them
    assert metrics["reward/kl_penalty_mean"] == pytest.approx(
        BETA * C.masked_sum(old - ref, mask, dim=-1).mean().item(), rel=1e-5
    )


def test_remax_advantages_are_verls_token_form(tmp_path):
    trainer = _trainer(tmp_path, "remax")
    rollout, old, ref = _step_inputs(trainer)
    mask = rollout.batch.response_mask
    adv, _ = trainer.advantages(1, rollout, trainer.reward_kl_penalty(rollout.batch, old, ref))
    token_rewards = C.token_level_rewards(
        rollout.rewards, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=BETA
    )
    expected = C.remax_advantages(token_rewards, rollout.greedy_rewards, mask)  # [B, T]
    assert adv.shape == mask.shape
    assert_close(adv, expected, rtol=0, atol=1e-6)


def test_gae_and_sppo_critics_take_the_penalty(tmp_path):
    ppo = _trainer(tmp_path, "ppo", "critic.whiten=false", "name=ppo")
    rollout, old, ref = _step_inputs(ppo)
    batch, mask = rollout.batch, rollout.batch.response_mask
    values = ppo.critic.values(batch)
    penalty = ppo.reward_kl_penalty(batch, old, ref)
    adv, returns = ppo.critic.advantages(batch, rollout.rewards, values, rollout.correct, penalty)
    token_rewards = C.token_level_rewards(
        rollout.rewards, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=BETA
    )
    exp_adv, exp_returns = C.gae_advantages(token_rewards, values, mask, whiten=False)
    assert_close(adv, exp_adv, rtol=0, atol=1e-6)
    assert_close(returns, exp_returns, rtol=0, atol=1e-6)

    sppo = _trainer(tmp_path, "sppo", "name=sppo")
    rollout, old, ref = _step_inputs(sppo)
    batch, mask = rollout.batch, rollout.batch.response_mask
    z = sppo.critic.values(batch)
    penalty = sppo.reward_kl_penalty(batch, old, ref)
    adv, targets = sppo.critic.advantages(batch, rollout.rewards, z, rollout.correct, penalty)
    R = C.token_level_rewards(
        rollout.rewards, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=BETA
    ).sum(-1)
    assert_close(adv, R - torch.sigmoid(z), rtol=0, atol=1e-6)
    assert torch.equal(
        targets, rollout.correct.to(targets.dtype)
    )  # the critic still learns P(correct)


def test_on_policy_runs_compute_pi_old_for_the_penalty(tmp_path):
    one = _trainer(tmp_path, "rloo", "algo.num_minibatches=1", "name=one")
    rollout = one.collect(1)
    old, _ = one.old_logprobs(rollout.batch)
    assert old is None  # the update needs no π_old pass, the reward's KL does
    ref = one.reference_logprobs(rollout.batch)
    penalty = one.reward_kl_penalty(rollout.batch, old, ref)
    mask = rollout.batch.response_mask
    expected = BETA * torch.where(mask, one._logprobs(one.model, rollout.batch) - ref, 0.0)
    assert_close(penalty, expected, rtol=0, atol=1e-7)
    assert penalty[mask].abs().sum() > 0


def test_compute_advantages_without_the_penalty_is_unchanged():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = torch.ones(6, 3, dtype=torch.bool)
    zero = torch.zeros(6, 3)
    for kind in ("group", "group_centered", "rloo"):
        plain = compute_advantages(kind, rewards, 3, eps=1e-6)
        assert torch.equal(compute_advantages(kind, rewards, 3, eps=1e-6), plain)
        with_zero = compute_advantages(kind, rewards, 3, eps=1e-6, kl_penalty=zero, mask=mask)
        assert_close(with_zero, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the response mask"):
        compute_advantages("rloo", rewards, 3, eps=1e-6, kl_penalty=zero)


def test_two_kl_placements_warn():
    cfg = load_config("grpo", ["reward.kl_coef=0.001"])
    assert any("penalised twice" in w for w in validate_warnings(cfg))
    assert validate_warnings(load_config("rloo")) == []
