"""π_old from the sampler or recomputed: at θ = θ_old every importance ratio the update sees is 1.

The sampler's log-probs are those of the distribution it drew from, μ (temperature and top-p
applied). With top-p = 1, μ is the policy's own tempered softmax, so taking μ as π_old (GSPO
§5.4) gives ratios of 1 up to float rounding at θ = θ_old; with top-p < 1, μ is renormalised
over the nucleus and π_θ/μ is the nucleus mass, below 1, so the combination is refused.
"""

import pytest
import torch

import seqrl.core as C
from seqrl.config import ConfigError, load_config
from seqrl.train.step import response_logprobs
from seqrl.train.trainer import Trainer


def _first_minibatch_ratios(tmp_path, *overrides) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ratio π_θ/π_old [B, T], mask [B, T], GSPO loss metrics) on step 1's rollout at θ_old."""
    cfg = load_config(
        "gspo",
        [
            "model.policy=builtin:tiny-addition",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "task.eval_size=4",
            f"output_dir={tmp_path}",
            "name=run",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, progress=False)
    batch = trainer.collect(1).batch
    old, _ = trainer.old_logprobs(batch)  # the sampler's μ, or recomputed at θ_old
    rows = torch.arange(batch.response_ids.shape[0])
    with torch.no_grad():  # the update's forward on its first minibatch, θ = θ_old
        logprobs, _ = response_logprobs(
            trainer.model, batch, rows, temperature=cfg.rollout.temperature
        )
    mask = batch.response_mask
    advantages = torch.linspace(-1, 1, mask.shape[0])  # [B], half of them negative
    out = C.policy_loss(
        "gspo", logprobs=logprobs, old_logprobs=old, advantages=advantages, mask=mask
    )
    ratio = torch.exp(torch.where(mask, logprobs - old, torch.zeros_like(old)))
    return ratio, mask, out.metrics


@pytest.mark.parametrize("engine", ["hf", "fast"])
@pytest.mark.parametrize(
    "source, temperature, top_p",
    [("sampler", 1.0, 1.0), ("sampler", 0.7, 1.0), ("recompute", 0.7, 0.8)],
)
def test_every_ratio_is_one_at_theta_old(tmp_path, engine, source, temperature, top_p):
    ratio, mask, metrics = _first_minibatch_ratios(
        tmp_path,
        f"rollout.engine={engine}",
        f"rollout.old_logprobs_source={source}",
        f"rollout.temperature={temperature}",
        f"rollout.top_p={top_p}",
    )
    assert mask.any()
    torch.testing.assert_close(ratio[mask], torch.ones_like(ratio[mask]), rtol=0, atol=1e-5)
    # GSPO's clip range is [1 − 3e-4, 1 + 4e-4]: nothing is clipped on the first minibatch
    assert metrics["policy/clip_frac"] == 0 and metrics["policy/seq_clip_frac"] == 0


def test_sampler_logprobs_with_top_p_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("gspo", ["rollout.old_logprobs_source=sampler", "rollout.top_p=0.9"])
    message = str(err.value)
    assert "rollout.old_logprobs_source='sampler'" in message and "rollout.top_p=0.9" in message
    assert "old_logprobs_source=recompute" in message and "rollout.top_p=1" in message
    # either fix is a valid config
    load_config("gspo", ["rollout.old_logprobs_source=recompute", "rollout.top_p=0.9"])
    load_config("gspo", ["rollout.old_logprobs_source=sampler", "rollout.top_p=1.0"])


def test_why_the_combination_is_refused(tmp_path):
    """With top-p < 1 the sampler's μ is the nucleus-renormalised policy: taken as π_old, every
    ratio at θ = θ_old is the nucleus mass ≤ 1 and GSPO clips negative-advantage responses
    before any update. The trainer is driven past the config check to show it."""
    cfg_ok = ["rollout.old_logprobs_source=recompute", "rollout.top_p=0.6"]
    ratio, mask, _ = _first_minibatch_ratios(tmp_path, *cfg_ok)
    torch.testing.assert_close(ratio[mask], torch.ones_like(ratio[mask]), rtol=0, atol=1e-5)

    cfg = load_config("gspo", ["model.policy=builtin:tiny-addition", *cfg_ok])
    trainer = Trainer(cfg, run_dir=tmp_path / "run", progress=False)
    batch = trainer.collect(1).batch
    mu = batch.sampler_logprobs  # what old_logprobs_source=sampler would use as π_old
    rows = torch.arange(batch.response_ids.shape[0])
    with torch.no_grad():
        logprobs, _ = response_logprobs(trainer.model, batch, rows, temperature=1.0)
    mask = batch.response_mask
    nucleus_mass = torch.exp(logprobs - mu)[mask]
    assert (nucleus_mass <= 1 + 1e-5).all() and nucleus_mass.min() < 0.999
    advantages = -torch.ones(mask.shape[0])  # every response below its group's mean
    out = C.policy_loss(
        "gspo", logprobs=logprobs, old_logprobs=mu, advantages=advantages, mask=mask
    )
    assert out.metrics["policy/seq_clip_frac"] > 0  # clipped before the policy has moved


def _collected(tmp_path, name, *overrides):
    cfg = load_config(
        "gspo",
        [
            "model.policy=builtin:tiny-addition",
            "rollout.prompts_per_step=8",
            "rollout.group_size=8",
            "rollout.old_logprobs_source=sampler",
            "task.eval_size=4",
            f"output_dir={tmp_path}",
            f"name={name}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, progress=False)
    try:
        return trainer, trainer.collect(1).batch
    finally:
        trainer.close()


def test_logprob_noise_perturbs_only_the_reported_logprobs(tmp_path):
    _, clean = _collected(tmp_path, "clean")
    trainer, noisy = _collected(tmp_path, "noisy", "rollout.logprob_noise=0.3")
    _, again = _collected(tmp_path, "again", "rollout.logprob_noise=0.3")
    for field in ("prompt_ids", "response_ids", "response_mask", "truncated"):
        assert torch.equal(getattr(clean, field), getattr(noisy, field))  # the same samples
    mask = clean.response_mask
    noise = (noisy.sampler_logprobs - clean.sampler_logprobs)[mask].double()
    assert noise.numel() > 100
    assert abs(noise.mean().item()) < 0.1 and 0.25 < noise.std().item() < 0.35
    assert torch.equal(noisy.sampler_logprobs[~mask], clean.sampler_logprobs[~mask])  # 0 stays
    assert torch.equal(noisy.sampler_logprobs, again.sampler_logprobs)  # seeded by run and step
    old, _ = trainer.old_logprobs(noisy)  # π_old is the noisy μ
    assert torch.equal(old, noisy.sampler_logprobs)


def test_logprob_noise_that_nothing_would_read_is_refused():
    with pytest.raises(ConfigError, match=r"rollout\.logprob_noise=0\.1 perturbs"):
        load_config("gspo", ["rollout.logprob_noise=0.1"])
    load_config("gspo", ["rollout.logprob_noise=0.1", "algo.mismatch.correction=truncate"])
