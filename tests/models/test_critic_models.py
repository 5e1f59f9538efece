"""seqrl.models.critic: building critics from the policy, a built-in size or a directory."""

import pytest
import torch
from transformers import AutoModelForTokenClassification, Qwen2ForTokenClassification

from seqrl.models import build_tiny_model, build_tokenizer, save_policy
from seqrl.models.critic import build_critic, save_critic


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return build_tiny_model(tok, size="nano", seed=7)


def test_policy_spec_copies_the_backbone_and_adds_one_fresh_output(tok, policy):
    critic = build_critic("policy", policy, tok, seed=0)
    assert isinstance(critic, Qwen2ForTokenClassification) and critic.config.num_labels == 1
    for (name, a), (_, b) in zip(
        critic.model.state_dict().items(), policy.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert critic.score.out_features == 1 and critic.dropout.p == 0.0
    # its own parameters: training the critic never moves the policy
    assert (
        critic.model.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()
    )
    again = build_critic("policy", policy, tok, seed=0)
    assert torch.equal(again.score.weight, critic.score.weight)  # seeded head
    state = torch.get_rng_state()
    build_critic("policy", policy, tok, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched


def test_builtin_sizes_and_unknown_names(tok, policy):
    small = build_critic("builtin:nano", policy, tok)
    assert small.config.hidden_size == 64 and not torch.equal(
        small.model.embed_tokens.weight, policy.model.embed_tokens.weight
    )
    with pytest.raises(FileNotFoundError, match="builtin:nano, builtin:tiny"):
        build_critic("builtin:huge", policy, tok)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        build_critic("/nonexistent/critic", policy, tok)


def test_saved_critic_and_causal_lm_directories(tok, policy, tmp_path):
    critic = build_critic("policy", policy, tok, seed=3)
    save_critic(critic, tok, tmp_path / "critic")
    reloaded = build_critic(str(tmp_path / "critic"), policy, tok, seed=99)
    for a, b in zip(critic.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # head included: a saved critic is loaded whole
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "critic")
    assert torch.equal(hf.score.weight, critic.score.weight)
    save_policy(policy, tok, tmp_path / "lm")  # a causal LM: its backbone, a fresh head
    from_lm = build_critic(str(tmp_path / "lm"), policy, tok, seed=3)
    assert torch.equal(from_lm.model.norm.weight, policy.model.norm.weight)
    assert torch.equal(from_lm.score.weight, critic.score.weight)


def test_a_critic_whose_vocabulary_is_too_small_is_refused(tok, policy, tmp_path):
    small_vocab = build_tiny_model(tok, size="nano", seed=0, vocab_size=len(tok) - 5)
    save_policy(small_vocab, tok, tmp_path / "lm")
    with pytest.raises(ValueError, match="vocabulary"):
        build_critic(str(tmp_path / "lm"), policy, tok)
