"""FastSampler against model.generate (HFSampler): same tokens, same log-probs, same fallbacks."""

import copy

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from seqrl.models import load_policy
from seqrl.rollout import FastSampler, HFSampler
from seqrl.rollout.fast import top_p_filter, unsupported_reason
from seqrl.tasks import get_task


@pytest.fixture(scope="module")
def addition():
    model, tok = load_policy("builtin:tiny-addition")
    task = get_task("addition", digits=3, seed=1)
    prompts = [e.prompt for e in task.examples("train", 6)] + ["1+2="]  # ragged prompt lengths
    return model, tok, prompts


@pytest.fixture(scope="module")
def nano():
    model, tok = load_policy("builtin:nano")
    task = get_task("addition", digits=2, seed=1)
    prompts = [e.prompt for e in task.examples("train", 3)] + ["1+2="]
    return model.double(), tok, prompts


def _both(model, tok, prompts, *, seed=0, group_size=1, greedy=False, **kwargs):
    out = []
    for cls in (HFSampler, FastSampler):
        torch.manual_seed(seed)
        out.append(
            cls(model, tok, **kwargs).generate(prompts, group_size=group_size, greedy=greedy)
        )
    return out


def _assert_same(ref, fast, atol):
    assert torch.equal(fast.prompt_ids, ref.prompt_ids)
    assert torch.equal(fast.prompt_mask, ref.prompt_mask)
    assert torch.equal(fast.response_ids, ref.response_ids)
    assert torch.equal(fast.response_mask, ref.response_mask)
    assert torch.equal(fast.truncated, ref.truncated)
    assert fast.group_size == ref.group_size
    torch.testing.assert_close(fast.sampler_logprobs, ref.sampler_logprobs, rtol=0, atol=atol)


def test_greedy_is_token_identical_to_generate_and_stops_when_all_rows_end(addition):
    model, tok, prompts = addition
    ref, fast = _both(model, tok, prompts, greedy=True, max_new_tokens=16)
    _assert_same(ref, fast, atol=1e-5)
    assert fast.response_ids.shape[1] < 16 and not fast.truncated.any()  # early exit, as generate


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_sampling_draws_the_same_tokens_as_generate(nano, temperature, top_p):
    model, tok, prompts = nano
    ref, fast = _both(
        model, tok, prompts, group_size=4, max_new_tokens=7, temperature=temperature, top_p=top_p
    )
    assert ref.response_mask.sum(-1).unique().numel() > 1  # some rows stop early, some do not
    _assert_same(ref, fast, atol=0)  # float64 model: identical draws, identical log-probs
    assert torch.isfinite(fast.sampler_logprobs).all()


def test_the_trained_model_samples_the_same_tokens_in_float32(addition):
    model, tok, prompts = addition
    ref, fast = _both(model, tok, prompts, seed=3, group_size=8, max_new_tokens=8, top_p=0.95)
    _assert_same(ref, fast, atol=1e-5)


def test_top_p_filter_is_transformers_top_p():
    torch.manual_seed(0)
    scores = torch.randn(16, 50)
    scores[:, :5] = 1.0  # ties at the boundary
    for top_p in (0.1, 0.5, 0.9, 0.999):
        expected = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(top_p_filter(scores, top_p), expected)
    uniform = torch.zeros(1, 4)  # cumulative mass exactly 0.25, 0.5, ...: the boundary is inclusive
    assert torch.isinf(top_p_filter(uniform, 0.5)).sum() == 2
    assert torch.equal(top_p_filter(uniform, 0.5), TopPLogitsWarper(0.5)(None, uniform.clone()))


def test_models_whose_generation_config_adds_processors_use_generate(nano):
    model, tok, prompts = nano
    assert unsupported_reason(model) is None
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.3
    sampler = FastSampler(penalised, tok, max_new_tokens=7)
    assert sampler.fallback_reason == "generation_config.repetition_penalty=1.3"
    ref, fast = _both(penalised, tok, prompts, group_size=2, max_new_tokens=7)
    _assert_same(ref, fast, atol=0)
    # the lean loop (no penalty) would have sampled something else from this seed
    torch.manual_seed(0)
    lean = FastSampler(model, tok, max_new_tokens=7).generate(prompts, group_size=2)
    assert not torch.equal(lean.response_ids, fast.response_ids)


def test_generation_restores_the_training_mode(nano):
    model, tok, prompts = nano
    model.train()
    FastSampler(model, tok, max_new_tokens=3).generate(prompts, group_size=2)
    assert model.training
    model.eval()


def test_a_model_without_a_transformers_cache_uses_generate(nano, monkeypatch):
    model, tok, prompts = nano
    sampler = FastSampler(model, tok, max_new_tokens=5)
    forward = type(model).forward

    def legacy_cache(self, *args, **kwargs):  # a model handing back a plain tuple cache
        out = forward(self, *args, **kwargs)
        key = "cache" if "cache" in out else "past_key_values"
        if kwargs.get("logits_to_keep") == 1 and out.get(key) is not None:
            out[key] = tuple(out[key].layers)
        return out

    monkeypatch.setattr(type(model), "forward", legacy_cache)
    torch.manual_seed(0)
    fast = sampler.generate(prompts, group_size=2)
    assert sampler.fallback_reason == "the model returned a tuple KV cache"
    monkeypatch.undo()
    torch.manual_seed(0)
    ref = HFSampler(model, tok, max_new_tokens=5).generate(prompts, group_size=2)
    _assert_same(ref, fast, atol=1e-6)  # generate's float32 log-probs, computed on another call


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_per_prompt_streams_draw_the_same_tokens_as_hf_with_seeds(nano, temperature, top_p):
    model, tok, prompts = nano
    seeds = [11, 12, 13, 14]
    kwargs = dict(max_new_tokens=8, temperature=temperature, top_p=top_p)
    ref = HFSampler(model, tok, **kwargs).generate(prompts, group_size=3, seeds=seeds)
    fast = FastSampler(model, tok, **kwargs).generate(prompts, group_size=3, seeds=seeds)
    _assert_same(ref, fast, atol=1e-9)
    # a prompt's responses do not depend on the rest of the batch
    alone = FastSampler(model, tok, **kwargs).generate(prompts[2:3], group_size=3, seeds=seeds[2:3])
    assert torch.equal(
        alone.response_ids[:, : fast.response_ids.shape[1]][alone.response_mask],
        fast.response_ids[6:9, : alone.response_ids.shape[1]][alone.response_mask],
    )


@pytest.fixture
def compactions(monkeypatch):
    """The sizes the decode batch is compacted to (DynamicCache.batch_select_indices calls)."""
    from transformers import DynamicCache

    sizes, select = [], DynamicCache.batch_select_indices

    def counting(self, indices):
        sizes.append(indices.numel())
        return select(self, indices)

    monkeypatch.setattr(DynamicCache, "batch_select_indices", counting)
    return sizes


@pytest.mark.parametrize("streams", ["global", "per-prompt"])
def test_finished_rows_leave_the_decode_batch_and_nothing_else_changes(nano, compactions, streams):
    model, tok, prompts = nano
    kwargs = dict(max_new_tokens=24, temperature=0.9, top_p=0.95)
    seeds = [5, 6, 7, 8] if streams == "per-prompt" else None
    out, after = {}, {}
    for compact_at in (None, 0.01, 0.5):  # never, at every finished row, at half the batch
        torch.manual_seed(0)
        sampler = FastSampler(model, tok, compact_at=compact_at, **kwargs)
        out[compact_at] = sampler.generate(prompts, group_size=4, seeds=seeds)
        after[compact_at] = torch.rand(3)  # the global stream is left where it was
        if compact_at is None:
            assert not compactions
    assert compactions and min(compactions) < 16  # rows really left the batch
    lengths = out[None].response_mask.sum(-1)
    assert lengths.unique().numel() > 2 and lengths.max() == 24  # rows end at different steps
    for compact_at in (0.01, 0.5):
        _assert_same(out[None], out[compact_at], atol=0)  # float64: identical draws and floats
        assert torch.equal(after[compact_at], after[None])
    torch.manual_seed(0)
    ref = HFSampler(model, tok, **kwargs).generate(prompts, group_size=4, seeds=seeds)
    _assert_same(ref, out[0.01], atol=1e-9)


def test_compaction_keeps_the_trained_models_samples_in_float32(addition, compactions):
    model, tok, prompts = addition
    seeds = list(range(len(prompts)))
    out = {
        compact_at: FastSampler(model, tok, compact_at=compact_at, max_new_tokens=12).generate(
            prompts, group_size=8, seeds=seeds
        )
        for compact_at in (None, 0.25)
    }
    assert compactions
    _assert_same(out[None], out[0.25], atol=1e-5)


def test_compact_at_must_be_a_share():
    model, tok = load_policy("builtin:nano")
    with pytest.raises(ValueError, match="compact_at"):
        FastSampler(model, tok, max_new_tokens=4, compact_at=0)
