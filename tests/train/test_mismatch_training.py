"""Train–inference mismatch in the loop, on CPU with the HF sampler's own log-probs as μ.

top-p < 1 makes a real mismatch: the sampler draws from the nucleus renormalised (μ), while
π_old is the full softmax, so ρ = π_old/μ = (nucleus mass) ≤ 1 on every sampled token.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from seqrl.config import load_config
from seqrl.models import load_policy
from seqrl.rollout import HFSampler
from seqrl.train.step import UpdateSettings, batch_logprobs, update_policy
from seqrl.train.trainer import Trainer


def _batch(top_p: float):
    model, tok = load_policy("builtin:tiny-addition")
    sampler = HFSampler(model, tok, max_new_tokens=6, temperature=1.3, top_p=top_p)
    batch = sampler.generate(["12+34=", "5+6=", "70+8="], group_size=4, seeds=[1, 2, 3])
    return model, batch


def _update(model, batch, correction: str, cap: float) -> dict:
    model = copy.deepcopy(model)
    old = batch_logprobs(model, batch, temperature=1.3, micro_batch_size=4)
    advantages = torch.linspace(-1, 1, batch.response_ids.shape[0])  # [B]
    settings = UpdateSettings("dapo", {}, 2, 1, 4, 1e9, 1.3, correction, "token", cap)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics, _ = update_policy(model, opt, batch, advantages, old, None, settings,
                               torch.Generator().manual_seed(0))  # fmt: skip
    return metrics, model


def test_correction_weights_reach_the_loss():
    model, batch = _batch(top_p=0.8)
    start = copy.deepcopy(model.state_dict())
    plain, trained = _update(model, batch, "none", 2.0)
    assert any(not torch.equal(trained.state_dict()[k], v) for k, v in start.items())
    assert plain["mismatch/ratio_mean"] < 1.0  # ρ = nucleus mass ≤ 1
    assert plain["mismatch/ratio_max"] <= 1.0 + 1e-5
    assert "mismatch/weight_mean" not in plain
    # mask with C below every ρ: every weight is 0, so no gradient and no change
    masked, frozen = _update(model, batch, "mask", 1e-3)
    assert masked["mismatch/weight_mean"] == 0 and masked["mismatch/token_over_cap_frac"] == 1
    assert masked["policy/grad_norm"] == 0
    for k, v in start.items():
        assert torch.equal(frozen.state_dict()[k], v), k
    # truncate with C above every ρ: w = ρ, so the step is shorter than the plain one's
    trunc, _ = _update(model, batch, "truncate", 10.0)
    assert trunc["mismatch/weight_mean"] == pytest.approx(plain["mismatch/ratio_mean"], rel=1e-6)
    assert 0 < trunc["policy/grad_norm"] < plain["policy/grad_norm"]


def test_no_mismatch_without_top_p():
    """top-p = 1: μ is π_old up to float rounding, so ρ ≈ 1 and truncation at C ≥ 1 is a no-op."""
    model, batch = _batch(top_p=1.0)
    plain, a = _update(model, batch, "none", 2.0)
    _, b = _update(model, batch, "truncate", 1.5)
    assert abs(plain["mismatch/ratio_mean"] - 1) < 1e-5 and abs(plain["mismatch/kl"]) < 1e-5
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def _run(fast_overrides, *overrides):
    cfg = load_config(None, [*fast_overrides, "model.policy=builtin:tiny-addition",
                             "train.steps=1", *overrides])  # fmt: skip
    tmp_path = Path(cfg.output_dir)
    Trainer(cfg, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / cfg.name / "metrics.jsonl").open()]
    return next(r for r in rows if "mismatch/ratio_mean" in r)


@pytest.mark.slow
def test_the_trainer_logs_staleness_and_mismatch_separately(fast_overrides):
    m = _run(fast_overrides, "rollout.top_p=0.8", "algo.mismatch.correction=truncate",
             "algo.mismatch.cap=1.5")  # fmt: skip
    assert m["mismatch/ratio_mean"] < 1 and m["mismatch/kl"] > 0  # π_old vs μ
    assert 0 < m["mismatch/weight_mean"] < 1
    assert "policy/ratio_mean" in m and "mismatch/token_over_cap_frac" in m  # π_θ vs π_old
    # π_old taken from the sampler (GSPO §5.4; top-p = 1, as that source requires): the
    # mismatch ratio is 1 by construction
    s = _run([*fast_overrides, "name=run2"], "rollout.top_p=1.0",
             "rollout.old_logprobs_source=sampler")  # fmt: skip
    assert s["mismatch/ratio_mean"] == 1 and s["mismatch/kl"] == 0
