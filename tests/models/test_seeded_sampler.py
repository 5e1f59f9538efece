"""Per-prompt sampling streams: the draw of a prompt does not depend on its batch-mates, the
draw follows μ, and the returned log-probs are the sampler's μ (what π_old is compared with)."""

import torch

from seqrl.models import load_policy
from seqrl.rollout import HFSampler
from seqrl.train.step import batch_logprobs

PROMPTS = ["12+34=", "5+6=", "70+8=", "9+99="]


def _sampler(top_p: float = 1.0, temperature: float = 1.0, max_new_tokens: int = 7):
    model, tok = load_policy("builtin:tiny-addition")
    return HFSampler(
        model, tok, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )


def test_a_prompts_responses_do_not_depend_on_its_batch():
    sampler = _sampler(temperature=1.5)  # hot: the responses vary
    full = sampler.generate(PROMPTS, group_size=3, seeds=[10, 11, 12, 13])  # B = 12
    part = sampler.generate([PROMPTS[2], PROMPTS[0]], group_size=3, seeds=[12, 10])
    for rows_full, rows_part in ((slice(6, 9), slice(0, 3)), (slice(0, 3), slice(3, 6))):
        a, b = full.response_ids[rows_full], part.response_ids[rows_part]
        T = min(a.shape[1], b.shape[1])
        assert torch.equal(
            full.response_mask[rows_full].sum(-1), part.response_mask[rows_part].sum(-1)
        )
        assert torch.equal(a[:, :T], b[:, :T])
        torch.testing.assert_close(
            full.sampler_logprobs[rows_full][:, :T], part.sampler_logprobs[rows_part][:, :T],
            rtol=0, atol=1e-5,
        )  # fmt: skip
    assert len(set(map(tuple, full.response_ids.tolist()))) > 4  # the streams differ
    again = sampler.generate(PROMPTS, group_size=3, seeds=[10, 11, 12, 13])
    assert torch.equal(again.response_ids, full.response_ids)
    other = sampler.generate(PROMPTS, group_size=3, seeds=[20, 21, 22, 23])
    assert not torch.equal(other.response_ids, full.response_ids)


def test_first_tokens_follow_the_sampler_distribution():
    """2000 one-token draws with distinct streams: frequencies match μ within 4.5 σ."""
    sampler = _sampler(temperature=2.0, max_new_tokens=1)
    n = 2000
    batch = sampler.generate(["37+"], group_size=n, seeds=[5])
    ids = batch.response_ids[:, 0]  # [n]
    probs = batch.sampler_logprobs[0:1, 0].exp()  # μ of the drawn token, one row
    # μ over the whole vocabulary: the same prompt, so row 0's distribution is every row's
    enc = sampler.encode(["37+"])
    with torch.no_grad():
        logits = sampler.model(input_ids=enc[0], attention_mask=enc[1].long()).logits[0, -1]
    mu = torch.softmax(logits.double() / 2.0, dim=-1)  # [V]
    torch.testing.assert_close(probs.double(), mu[ids[0]].reshape(1), rtol=0, atol=1e-5)
    freq = torch.bincount(ids, minlength=mu.numel()).double() / n
    sigma = (mu * (1 - mu) / n).sqrt()
    assert ((freq - mu).abs() <= 4.5 * sigma + 1e-3).all()
    assert (mu > 0.02).sum() >= 3  # the check covers several likely tokens


def test_sampler_logprobs_are_mu_with_top_p_and_temperature():
    """top-p = 1: recomputed π_old equals μ. top-p < 1: μ is renormalised over the nucleus,
    so μ ≥ π_old on every sampled token (the mismatch ratio π_old/μ ≤ 1)."""
    for top_p in (1.0, 0.7):
        sampler = _sampler(top_p=top_p, temperature=1.3)
        batch = sampler.generate(PROMPTS, group_size=4, seeds=[1, 2, 3, 4])
        old = batch_logprobs(sampler.model, batch, temperature=1.3, micro_batch_size=5)
        mask = batch.response_mask
        if top_p == 1.0:
            torch.testing.assert_close(old[mask], batch.sampler_logprobs[mask], rtol=0, atol=1e-5)
        else:
            assert (old[mask] <= batch.sampler_logprobs[mask] + 1e-5).all()
            assert (old[mask] < batch.sampler_logprobs[mask] - 1e-3).any()
