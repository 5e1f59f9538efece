"""Critics on real tiny Qwen2 models: spec invariants 15, 17, 18 and 32 at the model level,
SPPO and PPO runs from the CLI, calibration, and the tail-effect diagnostic."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import seqrl.core as C
from seqrl.config import ConfigError, load_config, validate_warnings
from seqrl.models import build_tiny_model, build_tokenizer
from seqrl.models.critic import build_critic
from seqrl.rollout import RolloutBatch, response_mask_from_tokens
from seqrl.train.critic import (
    Critic,
    CriticSettings,
    calibration_metrics,
    critic_step,
    pass_rates,
    pearson,
    spearman,
)
from seqrl.train.diagnose import separation
from seqrl.train.forward import batch_values
from seqrl.train.step import response_logprobs
from seqrl.train.trainer import Trainer


def make_batch(tok, prompts, responses) -> RolloutBatch:
    """A G = 1 rollout batch of given prompts and responses, laid out as the sampler does."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    resp = [[*tok.encode(r, add_special_tokens=False), tok.eos_token_id] for r in responses]
    T = max(map(len, resp))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in resp])
    mask, truncated = response_mask_from_tokens(ids, tok.eos_token_id)
    zeros = torch.zeros(ids.shape)
    return RolloutBatch(
        enc["input_ids"], enc["attention_mask"].bool(), ids, mask, zeros, truncated, 1
    )


def make_critic(
    kind, spec="policy", *, lr=1e-2, minibatches=2, micro=3, whiten=False, lam=1.0, token_loss="mse"
):
    tok = build_tokenizer()
    policy = build_tiny_model(tok, size="nano", seed=1)
    model = build_critic(spec, policy, tok, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    settings = CriticSettings(
        kind=kind,
        num_minibatches=minibatches,
        ppo_epochs=1,
        micro_batch_size=micro,
        grad_clip=1.0,
        whiten=whiten,
        lam=lam,
        token_loss=token_loss,
    )
    return Critic(model, opt, sched, settings), policy, tok


PROMPTS = ["12+345=", "7+8=", "100+1=", "55+55="]
RESPONSES = ["357", "15", "10", "110"]
REWARDS = torch.tensor([1.0, 1.0, 0.0, 1.0])


def test_inv15_sppo_advantage_is_r_minus_sigmoid_of_the_critic_before_its_update():
    critic, _, tok = make_critic("scalar")
    batch = make_batch(tok, PROMPTS, RESPONSES)
    z_before = batch_values(critic.model, batch, "scalar", 3)  # [B], same micro-batches
    advantages, metrics = critic_step(critic, batch, REWARDS, torch.Generator().manual_seed(0))
    assert torch.equal(advantages, REWARDS - torch.sigmoid(z_before))
    z_after = batch_values(critic.model, batch, "scalar", 3)
    assert not torch.equal(z_after, z_before)  # the critic was updated, after the advantages
    assert torch.equal(advantages > 0, REWARDS == 1) and bool((advantages.abs() < 1).all())
    assert {"critic/loss", "critic/grad_norm", "critic/pred_mean", "critic/lr"} <= set(metrics)


def test_scalar_critic_loss_is_the_mean_over_every_row_even_when_responses_are_masked():
    """Overlong filtering masks a response out of the policy loss; its reward still teaches
    V(prompt), so the scalar critic's BCE is the mean over all rows of the minibatch."""
    critic, _, tok = make_critic("scalar", minibatches=1, micro=3)
    batch = make_batch(tok, PROMPTS, RESPONSES)
    masked = batch.response_mask.clone()
    masked[2:] = False  # two rows filtered out of the policy loss
    batch = dataclasses.replace(batch, response_mask=masked)
    z = batch_values(critic.model, batch, "scalar", 4)  # [B]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z, REWARDS).item()
    metrics = critic.update(batch, REWARDS, None, torch.Generator().manual_seed(0))
    assert metrics["critic/loss"] == pytest.approx(expected, rel=1e-5)


def test_inv17_bce_critic_optimum_is_the_empirical_success_rate():
    """20 samples each of 4 prompts with success rates 0.1, 0.35, 0.6, 0.9: sigmoid(z) → rate."""
    critic, _, tok = make_critic("scalar", "builtin:nano", lr=3e-3, minibatches=1, micro=80)
    rates = [0.1, 0.35, 0.6, 0.9]
    prompts = [p for p in PROMPTS for _ in range(20)]
    rewards = torch.tensor([float(j < round(r * 20)) for r in rates for j in range(20)])
    batch = make_batch(tok, prompts, ["1"] * len(prompts))
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        critic.update(batch, rewards, None, gen)
    predicted = torch.sigmoid(batch_values(critic.model, batch, "scalar", 80)).view(4, 20)
    assert_close(predicted[:, 0], torch.tensor(rates), rtol=0, atol=0.03)
    assert bool((predicted == predicted[:, :1]).all())  # one value per prompt


def test_inv18_sppo_equals_ppo_gae_with_constant_critic_and_no_whitening():
    """GAE(γ = λ = 1), terminal reward, no whitening, V(s_t) ≡ V(s_p): same advantages, loss and
    gradient as SPPO, on a real policy's log-probs."""
    scalar, policy, tok = make_critic("scalar")
    token, _, _ = make_critic("token", whiten=False)
    batch = make_batch(tok, PROMPTS, RESPONSES)
    mask = batch.response_mask
    z = scalar.values(batch)  # [B]
    sppo_adv, sppo_targets = scalar.advantages(batch, REWARDS, z)  # [B]
    constant = torch.where(mask, torch.sigmoid(z)[:, None], 0.0)  # [B, T] V(s_t) = V(s_p)
    gae_adv, returns = token.advantages(batch, REWARDS, constant)  # [B, T]
    assert torch.equal(gae_adv, C.broadcast_to_tokens(sppo_adv, mask))
    assert torch.equal(returns, C.broadcast_to_tokens(sppo_targets, mask))

    rows = torch.arange(len(PROMPTS))

    def loss_and_grad(name, adv):
        policy.zero_grad()
        lp, _ = response_logprobs(policy, batch, rows, temperature=1.0)
        old = lp.detach() + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
        out = C.policy_loss(name, logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in policy.parameters()]

    loss_s, grad_s = loss_and_grad("sppo", sppo_adv)
    loss_p, grad_p = loss_and_grad("ppo", gae_adv)
    assert torch.equal(loss_s, loss_p)
    for a, b in zip(grad_s, grad_p, strict=True):
        assert torch.equal(a, b)
    # whitening breaks the identity (the test can tell them apart)
    whitened, _ = make_critic("token", whiten=True)[0].advantages(batch, REWARDS, constant)
    assert not torch.allclose(whitened, gae_adv)


def test_inv32_gae_on_a_real_token_critic():
    critic, _, tok = make_critic("token", whiten=False)
    batch = make_batch(tok, PROMPTS, RESPONSES)
    mask = batch.response_mask
    values = critic.values(batch)  # [B, T] V(s_t), 0 on padding
    adv, returns = critic.advantages(batch, REWARDS, values)
    assert_close(adv, torch.where(mask, REWARDS[:, None] - values, 0.0), rtol=0, atol=1e-6)
    expected_returns = torch.where(mask, REWARDS[:, None].expand_as(values), 0.0)
    assert_close(returns, expected_returns, rtol=0, atol=1e-6)  # (R − V) + V = R up to rounding
    td, _ = make_critic("token", whiten=False, lam=0.0)[0].advantages(batch, REWARDS, values)
    next_v = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    rewards_t = C.token_level_rewards(REWARDS, mask)
    assert_close(td, torch.where(mask, rewards_t + next_v - values, 0.0), rtol=0, atol=1e-6)


def test_ppo_bce_token_critic_is_a_per_token_sigmoid_trained_towards_the_reward():
    """The SPPO paper's "PPO + BCE" ablation (§4.3): V(s_t) = σ(z_t), BCE towards G_t = R."""
    critic, _, tok = make_critic("token", "builtin:nano", lr=3e-3, token_loss="bce")
    batch = make_batch(tok, PROMPTS, RESPONSES)
    mask = batch.response_mask
    values = critic.values(batch)
    assert bool(((values > 0) & (values < 1))[mask].all()) and bool((values[~mask] == 0).all())
    adv, returns = critic.advantages(batch, REWARDS, values)
    assert_close(adv, torch.where(mask, REWARDS[:, None] - values, 0.0), rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        metrics = critic.update(batch, returns, values, gen)
    assert "critic/value_clip_frac" not in metrics  # the BCE loss, not the clipped MSE
    fitted = critic.values(batch)
    assert_close(fitted[mask], returns[mask], rtol=0, atol=0.15)  # 4 sequences: it can fit them


# ---- the critic's target under reward shaping ------------------------------------------------

OUTCOMES = torch.tensor([True, True, False, True])  # the verifier's verdicts behind REWARDS
SHAPED = torch.tensor([1.0, 0.75, -1.0, 1.0])  # ±1 reward, row 1 with an overlong penalty


def test_scalar_critic_learns_the_outcome_and_baselines_the_shaped_reward():
    """reward.incorrect = −1 and a length penalty: BCE still targets the 0/1 outcome, and
    A = R − (r_w + (1 − r_w)·σ(z)) with r_w = −1."""
    critic, _, tok = make_critic("scalar", minibatches=1, micro=4)
    critic.settings = dataclasses.replace(critic.settings, incorrect_reward=-1.0)
    batch = make_batch(tok, PROMPTS, RESPONSES)
    z = batch_values(critic.model, batch, "scalar", 4)  # [B], before the update
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, OUTCOMES.float()).item()
    adv, metrics = critic_step(critic, batch, SHAPED, torch.Generator().manual_seed(0), OUTCOMES)
    assert_close(adv, SHAPED - (-1.0 + 2.0 * torch.sigmoid(z)), rtol=0, atol=1e-6)
    assert metrics["critic/target_mean"] == pytest.approx(0.75)  # targets are the 0/1 verdicts
    assert metrics["critic/loss"] == pytest.approx(bce, rel=1e-5)


def test_token_critic_targets_the_shaped_return_with_mse_and_the_outcome_with_bce():
    batch = make_batch(make_critic("token")[2], PROMPTS, RESPONSES)
    mask = batch.response_mask
    mse, _, _ = make_critic("token", whiten=False)
    values = mse.values(batch)
    _, returns = mse.advantages(batch, SHAPED, values, OUTCOMES)  # γ = λ = 1: G_t = R
    assert_close(returns, torch.where(mask, SHAPED[:, None], 0.0), rtol=0, atol=1e-6)
    bce, _, _ = make_critic("token", "builtin:nano", whiten=False, token_loss="bce")
    values = bce.values(batch)
    adv, returns = bce.advantages(batch, OUTCOMES.float(), values, OUTCOMES)
    assert_close(returns, torch.where(mask, OUTCOMES.float()[:, None], 0.0), rtol=0, atol=1e-6)
    assert_close(adv, torch.where(mask, OUTCOMES.float()[:, None] - values, 0.0), rtol=0, atol=1e-6)


def test_sppo_trainer_trains_its_critic_on_the_outcome_with_a_shaped_reward(tmp_path):
    cfg = load_config(
        "sppo",
        [
            "model.policy=builtin:nano",
            "rollout.prompts_per_step=8",
            "algo.micro_batch_size=8",
            "reward.incorrect=-1",
            "task.eval_size=4",
            f"output_dir={tmp_path}",
            "name=run",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.train_step(1)
    assert metrics["reward/mean"] < 0  # the random nano model is mostly wrong: R = −1
    assert metrics["critic/target_mean"] == pytest.approx(metrics["train/accuracy"])


def test_ppo_bce_refuses_a_shaped_reward():
    with pytest.raises(ConfigError, match=r"critic.token_loss='bce'.*reward.incorrect=-1"):
        load_config("ppo", ["critic.token_loss=bce", "reward.incorrect=-1"])
    load_config("ppo", ["critic.token_loss=mse", "reward.incorrect=-1"])  # a shaped return


def test_sppo_with_a_shaped_reward_says_what_the_advantage_is():
    (warning,) = validate_warnings(load_config("sppo", ["reward.incorrect=-1"]))
    assert "P(correct)" in warning and "A = R − (r_w + (1 − r_w)·V)" in warning
    assert validate_warnings(load_config("sppo")) == []


def test_calibration_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(50, generator=gen, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(50, generator=gen, dtype=torch.float64)).round(decimals=1)  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    m = calibration_metrics(x, y)
    assert m["critic/calibration_pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert pearson(x, torch.ones(50, dtype=torch.float64)) != pearson(x, x)  # NaN when constant


def test_pass_rates_group_the_k_samples_of_each_prompt():
    # the sampler lays out k = 2 samples per prompt consecutively: prompts [1, 1], [0, 0], [1, 0]
    hits = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert pass_rates(hits, 2).tolist() == [1.0, 0.0, 0.5]
    assert pass_rates(hits, 3).tolist() == [2 / 3, 1 / 3]


def test_separation_point_is_where_the_cis_stop_overlapping_for_good():
    # 20 correct and 20 incorrect rows, 6 positions; identical noise except the last 2 positions
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    values = torch.cat([noise, noise.clone()])
    values[:20, 4:] += 5.0
    values[:20, 1] += 5.0  # separated once early, then entangled again: not the separation point
    present = torch.ones_like(values, dtype=torch.bool)
    correct = torch.arange(40) < 20
    flags, point = separation(values, present, correct)
    assert flags == [False, True, False, False, True, True] and point == 4
    present[20:, 5] = False  # too few incorrect responses reach the last position
    present[21, 5] = True
    flags, point = separation(values, present, correct)
    assert flags[5] is None and point == 4


FAST = [
    "model.policy=builtin:nano",
    "rollout.prompts_per_step=8",
    "task.eval_size=8",
    "train.eval_samples=2",
    "train.eval_every=0",
    "algo.micro_batch_size=8",
    "log.tensorboard=false",
]


def _train_cli(tmp_path, name, *overrides):
    sets = [
        a
        for o in [*FAST, f"output_dir={tmp_path}", f"name={name}", *overrides]
        for a in ("--set", o)
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *sets],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / name
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return run, records


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sppo", "sppo_small_critic", "ppo"])
def test_critic_presets_train_from_the_cli(preset, tmp_path):
    extra = ["critic.warmup_steps=1"] if preset == "ppo" else []
    run, records = _train_cli(tmp_path, preset, f"preset={preset}", "train.steps=2", *extra)
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("critic/loss", "critic/grad_norm", "critic/pred_mean", "critic/lr"):
        assert all(key in r for r in steps), key
    if preset == "ppo":
        assert "policy/grad_norm" not in steps[0]  # critic warm-up: the policy waits
        assert "critic/value_clip_frac" in steps[0]
    assert "policy/grad_norm" in steps[-1]
    evals = [r for r in records if "eval/greedy_acc" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for key in ("critic/calibration_pearson", "critic/calibration_spearman"):
        assert all(key in r for r in evals), key
    calibration = [json.loads(x) for x in (run / "calibration.jsonl").read_text().splitlines()]
    assert [c["step"] for c in calibration] == [0, 2] and len(calibration[0]["predicted"]) == 8
    # the final critic is a standard HF token-classification model with one label
    from transformers import AutoModelForTokenClassification

    critic = AutoModelForTokenClassification.from_pretrained(run / "final" / "critic")
    assert critic.config.num_labels == 1
    assert critic.config.hidden_size == 64  # the nano policy's width (FAST) or the nano critic
    plot = subprocess.run(
        [sys.executable, "-m", "seqrl", "plot", str(run)], capture_output=True, text=True
    )
    assert plot.returncode == 0 and (run / "plots" / "calibration.png").stat().st_size > 0
    assert (run / "plots" / "critic.png").exists()


def test_small_critic_is_smaller_than_the_policy():
    cfg = load_config("sppo_small_critic", ["train.steps=1"])
    trainer = Trainer(cfg, progress=False)
    n_policy = sum(p.numel() for p in trainer.model.parameters())
    n_critic = sum(p.numel() for p in trainer.critic.model.parameters())
    assert n_critic * 10 < n_policy
    sppo = Trainer(load_config("sppo"), progress=False)  # policy-sized, from the policy's weights
    assert torch.equal(
        sppo.critic.model.model.embed_tokens.weight, sppo.model.model.embed_tokens.weight
    )


@pytest.mark.slow
def test_tail_effect_command_writes_its_png(tmp_path):
    run, _ = _train_cli(tmp_path, "ppo", "preset=ppo", "train.steps=2", "critic.warmup_steps=1")
    out = subprocess.run(
        [sys.executable, "-m", "seqrl", "diagnose", "tail-effect", str(run), "--prompts", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    png = run / "plots" / "tail_effect.png"
    assert png.stat().st_size > 10_000 and str(png) in out.stdout
    result = json.loads(png.with_suffix(".json").read_text())
    assert result["responses"] == 64 and result["correct"] + result["incorrect"] == 64
    assert "first_separated_from_end" in result and "95% CI" in result["definition"]
    # an SPPO run has no token critic: a clear error
    sppo, _ = _train_cli(tmp_path, "sppo", "preset=sppo", "train.steps=1")
    bad = subprocess.run(
        [sys.executable, "-m", "seqrl", "diagnose", "tail-effect", str(sppo)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "preset=ppo" in bad.stderr


def test_a_critic_run_without_sampled_evaluation_trains_and_logs_no_calibration(fast_overrides):
    cfg = load_config(
        None,
        [*fast_overrides, "preset=sppo", "model.policy=builtin:nano", "train.eval_samples=0",
         "train.steps=1", "rollout.prompts_per_step=4", "rollout.group_size=1"],
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    trainer.fit()  # the step-0 and final evaluations are greedy only: nothing to calibrate
    assert not (trainer.run_dir / "calibration.jsonl").exists()
