"""The KV cache goes to each model's forward by the name it declares, and comes back from either."""

import warnings

import pytest
import torch
from torch import nn

from seqrl.models import load_policy
from seqrl.models.cache import cache_keyword, returned_cache
from seqrl.rollout import FastSampler, HFSampler
from seqrl.train.forward import shared_prefix_logits


class _OldForward(nn.Module):  # a model from before the rename
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return input_ids


class _NewForward(nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None):
        return input_ids


def test_the_keyword_is_the_one_the_forward_declares():
    assert cache_keyword(_OldForward()) == "past_key_values"
    assert cache_keyword(_NewForward()) == "cache"
    model, _ = load_policy("builtin:nano")
    import inspect

    declared = inspect.signature(type(model).forward).parameters
    assert cache_keyword(model) == ("cache" if "cache" in declared else "past_key_values")


def test_wrappers_are_asked_through_their_base_model():
    pytest.importorskip("peft")
    from seqrl.models.lora import AdaptersOff, apply_lora

    model, _ = load_policy("builtin:nano")
    lora = apply_lora(model, r=2, alpha=4)
    assert cache_keyword(lora) == cache_keyword(AdaptersOff(lora)) == cache_keyword(model)
    assert cache_keyword(AdaptersOff(_OldForward())) == "past_key_values"


def test_the_returned_cache_is_read_under_either_name():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(logits=torch.zeros(1))
    assert returned_cache(out) is None
    out["past_key_values" if "past_key_values" in out.__dataclass_fields__ else "cache"] = "kv"
    assert returned_cache(out) == "kv"


def test_sampling_and_the_shared_prefix_forward_raise_no_deprecation_warning():
    """Passing ``past_key_values`` to a model that takes ``cache`` warns on every run."""
    model, tok = load_policy("builtin:nano")
    prompts = ["12+34=", "5+6="]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FastSampler(model, tok, max_new_tokens=6).generate(prompts, group_size=3)
        batch = HFSampler(model, tok, max_new_tokens=6).generate(prompts, group_size=3)
        assert shared_prefix_logits(model, batch, torch.arange(6)) is not None
    messages = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not messages, messages
