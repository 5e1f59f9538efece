"""DAPO's scaffold and FIPO end to end, on real tiny models: dynamic sampling, overlong shaping,
FIPO ≡ DAPO on the first minibatch, the presets from the CLI."""

import copy
import json
import math
import subprocess
import sys

import pytest
import scipy.stats
import torch

import seqrl.core as C
from seqrl.config import load_config
from seqrl.rollout import HFSampler
from seqrl.train.sampling import collect_rollout, point_biserial, side_stream
from seqrl.train.step import UpdateSettings, batch_logprobs, response_logprobs, update_policy
from seqrl.train.trainer import Trainer

SMALL = [
    "model.policy=builtin:tiny-addition",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "task.eval_size=8",
    "train.eval_samples=1",
    "train.eval_every=0",
    "log.tensorboard=false",
]


def _trainer(tmp_path, *overrides) -> Trainer:
    cfg = load_config(None, [*SMALL, f"output_dir={tmp_path}", "name=run", *overrides])
    return Trainer(cfg, progress=False)


def _rollout(trainer: Trainer, step: int):
    side = side_stream(len(trainer.train_examples), seed=trainer.cfg.seed, step=step)
    return collect_rollout(
        trainer.sampler,
        trainer.tokenizer,
        trainer.task,
        trainer.prompts.step_examples(step),
        lambda start, n: [trainer.train_examples[int(side[i])] for i in range(start, start + n)],
        trainer.sampling_settings,
    )


# --------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_keeps_only_mixed_groups_up_to_the_prompt_count(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(
        tmp_path,
        "rollout.dynamic_sampling=true",
        "rollout.gen_batch_prompts=6",
        "rollout.max_gen_batches=10",
    )
    P, G = 4, 4
    batches_used = []
    for step in range(1, 5):
        out = _rollout(trainer, step)
        hits = out.correct.view(-1, G).sum(dim=1)  # [P'] correct answers per kept group
        assert len(out.examples) == hits.numel() <= P
        assert ((hits > 0) & (hits < G)).all(), hits  # neither all right nor all wrong
        rows = len(out.examples) * G
        assert out.batch.response_ids.shape[0] == len(out.texts) == out.rewards.numel() == rows
        m = out.metrics
        assert m["sampling/kept_groups"] == len(out.examples)
        assert m["sampling/short_of_target"] == P - len(out.examples)
        assert 1 <= m["sampling/gen_batches"] <= 10
        # every generated group was either kept, dropped, or cut because P were already kept
        assert (
            m["sampling/kept_groups"] + m["sampling/dropped_groups"]
            <= 6 * m["sampling/gen_batches"]
        )
        # the rewards line up with the kept rows: 1 if right, 0 if wrong (no shaping here)
        assert torch.equal(out.rewards, out.correct.float())
        batches_used.append(m["sampling/gen_batches"])
    assert max(batches_used) > 1  # the side stream was needed at least once


def test_dynamic_sampling_stops_at_the_cap_and_the_step_trains_on_nothing(tmp_path):
    # the randomly initialised nano model never answers right: every group is all-wrong
    trainer = _trainer(
        tmp_path,
        "model.policy=builtin:nano",
        "rollout.dynamic_sampling=true",
        "rollout.max_gen_batches=3",
        "train.steps=1",
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    summary = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["step"] == 1 and "sampling/gen_batches" in r)
    assert step["sampling/gen_batches"] == 3  # the cap, logged
    assert step["sampling/kept_groups"] == 0 and step["sampling/dropped_groups"] == 3 * 4
    assert step["sampling/short_of_target"] == 4
    assert "policy/grad_norm" not in step  # no group, no update
    assert summary["steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_side_stream_is_keyed_by_seed_and_step():
    a = side_stream(1000, seed=0, step=5)
    assert torch.equal(a, side_stream(1000, seed=0, step=5))
    assert not torch.equal(a, side_stream(1000, seed=0, step=6))
    assert not torch.equal(a, side_stream(1000, seed=1, step=5))
    assert torch.equal(a.sort().values, torch.arange(1000))


# --------------------------------------------------------------------------- overlong shaping


def test_soft_overlong_penalty_shape_through_the_trainer(tmp_path):
    # budget L_max = 6, window L_cache = 3: no penalty up to 3 tokens, then −1/3 per token
    torch.manual_seed(0)
    trainer = _trainer(
        tmp_path,
        "rollout.max_new_tokens=6",
        "reward.overlong_buffer=3",
        "reward.incorrect=-1",
        "rollout.prompts_per_step=16",
    )
    out = _rollout(trainer, 1)
    expected_penalty = {1: 0.0, 2: 0.0, 3: 0.0, 4: -1 / 3, 5: -2 / 3, 6: -1.0}
    lengths = out.batch.lengths.tolist()
    assert {4, 5} <= set(lengths)  # 3-digit sums: 3-4 digits + EOS
    for length, right, reward in zip(
        lengths, out.correct.tolist(), out.rewards.tolist(), strict=True
    ):
        base = 1.0 if right else -1.0
        assert reward == pytest.approx(base + expected_penalty[length], abs=1e-6), length
    penalty = out.metrics["reward/overlong_penalty_mean"]
    assert penalty == pytest.approx(sum(expected_penalty[n] for n in lengths) / len(lengths))


def _one_update(model, batch, advantages, loss_name="dapo", **overrides):
    """One SGD(lr=1) step on a copy: the parameter change is exactly minus the gradient."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    settings = UpdateSettings(
        loss_name=loss_name,
        loss_overrides=overrides,
        num_minibatches=1,
        ppo_epochs=1,
        micro_batch_size=8,
        grad_clip=1e9,
        temperature=1.0,
    )
    old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=8)
    update_policy(
        model, opt, batch, advantages, old, None, settings, torch.Generator().manual_seed(0)
    )
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("overlong_filter", [True, False])
def test_truncated_responses_contribute_nothing_with_overlong_filtering(tmp_path, overlong_filter):
    # a 4-token budget truncates every 4-digit sum (4 digits + EOS = 5 tokens)
    torch.manual_seed(0)
    trainer = _trainer(
        tmp_path,
        "rollout.max_new_tokens=4",
        f"reward.overlong_filter={str(overlong_filter).lower()}",
        "rollout.prompts_per_step=8",
    )
    out = _rollout(trainer, 1)
    batch, truncated = out.batch, out.batch.truncated
    assert truncated.any() and not truncated.all()
    assert out.metrics.get("train/overlong_filtered_frac", 0.0) == (
        truncated.double().mean().item() if overlong_filter else 0.0
    )
    if overlong_filter:
        assert not batch.response_mask[truncated].any()
    advantages = torch.randn(len(out.texts), generator=torch.Generator().manual_seed(1))
    reference = _one_update(trainer.model, batch, advantages)
    # change everything about the truncated rows: their tokens and their advantages
    ids = batch.response_ids.clone()
    ids[truncated] = torch.randint(3, 20, ids[truncated].shape)
    scrambled = type(batch)(
        batch.prompt_ids,
        batch.prompt_mask,
        ids,
        batch.response_mask,
        batch.sampler_logprobs,
        batch.truncated,
        batch.group_size,
    )
    flipped = torch.where(truncated, -10 * advantages, advantages)
    changed = _one_update(trainer.model, scrambled, flipped)
    same = all(torch.equal(a, b) for a, b in zip(reference, changed, strict=True))
    assert same == overlong_filter


# --------------------------------------------------------------------------- FIPO ≡ DAPO


@pytest.mark.parametrize("fipo_preset", ["official_32b", "7b"])
def test_fipo_equals_dapo_on_the_first_minibatch_of_a_rollout(fipo_preset):
    from seqrl.models import load_policy

    torch.manual_seed(0)
    model, tok = load_policy("builtin:nano")
    sampler = HFSampler(model, tok, max_new_tokens=12)
    batch = sampler.generate(["12+34=", "5+6=", "70+8=", "9+99="], group_size=4)  # B = 16
    mask = batch.response_mask.clone()  # [B, T] (a normal tensor, not an inference-mode one)
    rewards = torch.tensor([1.0, -1, -1, 1, -1, 1, 1, 1, 1, -1, -1, -1, 1, -1, 1, -1])
    adv = C.group_advantages(rewards, 4)
    rows = torch.arange(16)
    params = list(model.parameters())

    def loss_and_grads(name, **hp):
        old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=16)  # θ_old = θ
        logprobs, _ = response_logprobs(model, batch, rows, temperature=1.0)
        out = C.policy_loss(
            name, logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask, **hp
        )
        return out, torch.autograd.grad(out.loss, params)

    fipo, g_fipo = loss_and_grads("fipo", **C.FIPO_PRESETS[fipo_preset])
    dapo, g_dapo = loss_and_grads("dapo")
    assert fipo.metrics["fipo/weight_mean"] == 1.0  # θ = θ_old: every weight is 1
    assert fipo.metrics["policy/ratio_mean"] == 1.0
    torch.testing.assert_close(fipo.loss, dapo.loss, rtol=0, atol=0)
    for a, b in zip(g_fipo, g_dapo, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # negative control: after one optimiser step (the next minibatch) θ ≠ θ_old and they differ
    old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=16)
    with torch.no_grad():
        for p, g in zip(params, g_dapo, strict=True):
            p -= 0.5 * g / (g.norm() + 1e-12)
    logprobs, _ = response_logprobs(model, batch, rows, temperature=1.0)
    common = dict(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask)
    later_fipo = C.policy_loss("fipo", **common, **C.FIPO_PRESETS[fipo_preset])
    later_dapo = C.policy_loss("dapo", **common)
    assert later_fipo.metrics["fipo/weight_mean"] != 1.0
    assert not torch.equal(later_fipo.loss, later_dapo.loss)


# --------------------------------------------------------------------------- metrics


def test_point_biserial_matches_scipy_and_is_nan_when_constant():
    lengths = torch.tensor([3, 5, 9, 4, 12, 7, 7, 2])
    correct = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    expected = scipy.stats.pointbiserialr(correct.numpy(), lengths.numpy()).statistic
    assert point_biserial(lengths, correct) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(point_biserial(lengths, torch.ones(8, dtype=torch.bool)))
    assert math.isnan(point_biserial(torch.full((8,), 4), correct))
    assert math.isnan(point_biserial(torch.tensor([4]), torch.tensor([True])))


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dapo", "fipo"])
def test_dapo_and_fipo_presets_run_from_the_cli(preset, tmp_path):
    sets = [
        f"preset={preset}",
        "train.steps=2",
        f"output_dir={tmp_path}",
        "name=run",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.gen_batch_prompts=8",
        "task.eval_size=8",
        "train.eval_samples=1",
        "log.tensorboard=false",
    ]
    args = [a for s in sets for a in ("--set", s)]
    done = subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    expected = [
        "sampling/gen_batches",
        "sampling/kept_groups",
        "sampling/dropped_groups",
        "reward/overlong_penalty_mean",
        "response_len/q25",
        "response_len/q75",
        "response_len/corr_with_correct",
        "policy/kl_old",
        "policy/entropy",
        "policy/grad_norm",
        "policy/dual_clip_frac",
    ]
    if preset == "fipo":
        expected += [
            "fipo/weight_mean",
            "fipo/weight_above_1_frac",
            "fipo/weight_at_min_frac",
            "fipo/weight_at_max_frac",
            "fipo/safety_frac",
            "fipo/dropped_seqs",
        ]
    for key in expected:
        assert all(key in r for r in steps), key
    if preset == "fipo":  # 8 minibatches per rollout: 7 of 8 updates are off-policy
        assert any(r["fipo/weight_above_1_frac"] > 0 for r in steps)


def test_fipo_logs_a_token_mean_loss_with_the_drop_rule_on(tmp_path):
    # at θ = θ_old no token is dual-clipped, so the drop rule drops nothing and both report
    # the same token-mean loss (the drop-rule path accumulates token sums, then divides)
    torch.manual_seed(0)
    trainer = _trainer(tmp_path)
    out = _rollout(trainer, 1)
    adv = torch.randn(len(out.texts), generator=torch.Generator().manual_seed(2))  # [B]
    logged = {}
    for drop in (True, False):
        model = copy.deepcopy(trainer.model)
        settings = UpdateSettings(
            loss_name="fipo",
            loss_overrides={"drop_dual_clipped_sequences": drop},
            num_minibatches=1,
            ppo_epochs=1,
            micro_batch_size=4,  # 4 micro-batches
            grad_clip=1.0,
            temperature=1.0,
        )
        old = batch_logprobs(model, out.batch, temperature=1.0, micro_batch_size=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        metrics, _ = update_policy(
            model, opt, out.batch, adv, old, None, settings, torch.Generator().manual_seed(0)
        )
        logged[drop] = metrics["loss/policy"]
    assert logged[True] == pytest.approx(logged[False], rel=1e-6)
