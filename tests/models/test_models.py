"""seqrl.models: character tokenizer, tiny Qwen2 policy, load/save round trips."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import seqrl.models.load as load_mod
from seqrl.models import (
    ALPHABET,
    SPECIAL_TOKENS,
    TINY_CONFIGS,
    build_tiny_model,
    build_tokenizer,
    list_builtins,
    load_policy,
    num_parameters,
    save_policy,
)
from seqrl.tasks import get_task


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, size="tiny", seed=0)


def _task_texts() -> list[str]:
    texts = []
    for name, kw in [("addition", {"digits": 1}), ("addition", {"digits": 3})]:
        task = get_task(name, **kw)
        for ex in task.examples("train", 50) + task.examples("test", 5):
            texts += [ex.prompt, task.sft_target(ex), ex.prompt + task.sft_target(ex)]
    for digits in (2, 3):
        for operands in (3, 4, 5):
            task = get_task("scratchpad", digits=digits, operands=operands)
            for ex in task.examples("train", 20) + task.examples("test", 5):
                texts += [ex.prompt, task.sft_target(ex), ex.prompt + task.sft_target(ex)]
    return texts


# ---- tokenizer -----------------------------------------------------------------------------


def test_round_trip_on_every_task_text(tok):
    texts = _task_texts()
    assert any("\n" in t for t in texts)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, no specials added
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize(
    "text",
    [ALPHABET, "  leading and trailing  ", "a\n\nb\n", " \n \n", "x = (1+2)*3 - 4;", "#102"],
)
def test_round_trip_preserves_spaces_and_newlines(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list(text)
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == list(SPECIAL_TOKENS)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert len(tok) == len(SPECIAL_TOKENS) + len(ALPHABET)
    ids = [tok.bos_token_id, *tok("12+34=46")["input_ids"], tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "12+34=46"
    assert tok.decode(ids) == "<bos>12+34=46<eos><pad>"
    assert tok("1<eos>")["input_ids"] == [tok.convert_tokens_to_ids("1"), tok.eos_token_id]
    assert tok("é€")["input_ids"] == [tok.unk_token_id] * 2


def test_left_padding_batch_encode(tok):
    assert tok.padding_side == "left"
    batch = tok(["1+2=", "12+34=", "123+456="], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, 8)
    assert mask.sum(1).tolist() == [4, 6, 8]
    assert ids[0, :4].tolist() == [tok.pad_token_id] * 4 and mask[0, :4].sum() == 0
    assert mask[:, -1].all()  # real tokens are right-aligned, ready for generation
    assert tok.batch_decode(ids, skip_special_tokens=True) == ["1+2=", "12+34=", "123+456="]


# ---- tiny model ----------------------------------------------------------------------------


def test_param_count_and_config(model, tok):
    assert 1_500_000 <= num_parameters(model) <= 2_500_000
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings and cfg.vocab_size == len(tok)
    assert model.dtype == torch.float32
    for c in (cfg, model.generation_config):
        assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert set(TINY_CONFIGS) >= {"tiny"}


def test_init_is_deterministic_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tok, size="nano", seed=7)
    after = torch.rand(3)
    b = build_tiny_model(tok, size="nano", seed=7)
    c = build_tiny_model(tok, size="nano", seed=8)
    assert torch.equal(after, expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_forward_and_generate_shapes(model, tok):
    batch = tok(["1+2=", "12+34=", "123+456="], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=5, do_sample=True, top_p=1.0)
    assert logits.shape == (3, 8, len(tok))
    assert torch.isfinite(logits).all()  # pad positions too (masked-out rows must not give NaN)
    assert out.shape[0] == 3 and 8 < out.shape[1] <= 13
    assert torch.equal(out[:, :8], batch["input_ids"])


def test_left_padded_greedy_generation_matches_unpadded(model, tok):
    prompts = ["7+5=", "123+456="]
    batch = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model.generate(**batch, max_new_tokens=6, do_sample=False)
        single = model.generate(
            **tok(prompts[:1], return_tensors="pt"), max_new_tokens=6, do_sample=False
        )
    width = batch["input_ids"].shape[1]
    n = single.shape[1] - 4
    assert torch.equal(padded[0, width : width + n], single[0, 4:])


def test_save_load_round_trip_identical_logits(tmp_path, model, tok):
    out = save_policy(model, tok, tmp_path / "policy")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model2, tok2 = load_policy(str(out))
    text = "12+34=40+6=46\n46+56=90+12=102\n#102"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.decode(tok2(text)["input_ids"]) == text
    assert tok2.padding_side == "left" and tok2.pad_token_id == tok.pad_token_id
    assert model2.generation_config.eos_token_id == tok.eos_token_id
    batch = tok(["1+2=", text], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch).logits)


def test_load_policy_builtins_and_dtype():
    assert "builtin:tiny" in list_builtins() and "builtin:tiny-addition" in list_builtins()
    model, tok = load_policy("builtin:tiny")
    ref = build_tiny_model(tok, size="tiny", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    bf16, _ = load_policy("builtin:nano", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and not bf16.training


@pytest.mark.slow
def test_load_policy_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"builtin:tiny-addition"):
        load_policy("builtin:nope")
    with pytest.raises(FileNotFoundError, match=r"not an existing local directory or a .*Hub id"):
        load_policy(str(tmp_path / "missing" / "dir" / "x"))
    # a hub id, offline and not cached: say what to do (the hub client reads its env at import)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    code = "from seqrl.models import load_policy; load_policy('Qwen/Qwen2.5-0.5B')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert re.search(r"FileNotFoundError: .*Hugging Face Hub failed.*--local-dir DIR", done.stderr)
    with pytest.raises(ValueError, match=r"dtype"):
        load_policy("builtin:nano", dtype="float8")
    monkeypatch.setattr(load_mod, "ASSETS_DIR", tmp_path / "assets")
    with pytest.raises(FileNotFoundError, match=r"seqrl sft --out src/seqrl/assets/tiny-addition"):
        load_policy("builtin:tiny-addition")


def test_shipped_builtin_loads_from_assets(tmp_path, monkeypatch):
    model, tok = load_policy("builtin:nano")
    save_policy(model, tok, tmp_path / "tiny-addition")
    monkeypatch.setattr(load_mod, "ASSETS_DIR", tmp_path)
    model2, tok2 = load_policy("builtin:tiny-addition")
    assert (
        json.loads((tmp_path / "tiny-addition" / "config.json").read_text())["model_type"]
        == "qwen2"
    )
    x = tok(["12+34="], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**x).logits, model2(**x).logits)
    assert tok2.decode(tok2("1 2\n")["input_ids"]) == "1 2\n"


def test_shipped_warm_starts_behave_as_documented():
    """On held-out problems whose ones digits carry, tiny-addition mostly adds correctly and
    tiny-addition-noisy mostly writes its teacher's slip (the ones carry forgotten): the
    mistake the demo's RL run has to unlearn."""
    from seqrl.rollout import HFSampler
    from seqrl.tasks import get_task

    task = get_task("addition", digits=3, seed=1234)
    carry = [e for e in task.examples("test", 200) if task.slip_target(e) is not None][:48]
    for spec, correct_range, slip_range in (
        ("builtin:tiny-addition", (0.5, 1.0), (0.0, 0.2)),
        ("builtin:tiny-addition-noisy", (0.0, 0.3), (0.5, 1.0)),
    ):
        model, tok = load_policy(spec)
        sampler = HFSampler(model, tok, max_new_tokens=task.max_new_tokens)
        batch = sampler.generate([e.prompt for e in carry], group_size=1, greedy=True)
        texts = [t.strip() for t in tok.batch_decode(batch.response_ids, skip_special_tokens=True)]
        correct = sum(t == e.answer for t, e in zip(texts, carry, strict=True)) / len(carry)
        slipped = sum(t == task.slip_target(e) for t, e in zip(texts, carry, strict=True))
        slipped /= len(carry)
        assert correct_range[0] <= correct <= correct_range[1], (spec, correct)
        assert slip_range[0] <= slipped <= slip_range[1], (spec, slipped)


def test_shipped_scratchpad_warm_start_writes_its_teachers_slip():
    """tiny-scratchpad-noisy: on held-out problems where a line's ones carry, it mostly writes the
    teacher's slip (that carry forgotten), a 40–60-token answer that RL has to correct."""
    from seqrl.rollout import HFSampler
    from seqrl.tasks import get_task

    task = get_task("scratchpad", digits=2, operands=3, seed=1234)
    carry = [e for e in task.examples("test", 100) if task.slip_target(e) is not None][:32]
    model, tok = load_policy("builtin:tiny-scratchpad-noisy")
    sampler = HFSampler(model, tok, max_new_tokens=task.max_new_tokens)
    batch = sampler.generate([e.prompt for e in carry], group_size=1, greedy=True)
    texts = [t.strip() for t in tok.batch_decode(batch.response_ids, skip_special_tokens=True)]
    slipped = sum(t == task.slip_target(e) for t, e in zip(texts, carry, strict=True)) / len(carry)
    correct = sum(task.score(t, e) for t, e in zip(texts, carry, strict=True)) / len(carry)
    assert slipped >= 0.5 and correct <= 0.4, (slipped, correct)


def test_shipped_optional_scratchpad_warm_start_answers_mostly_bare_and_better_at_length():
    """tiny-scratchpad-optional: sampled at temperature 1, most answers are a bare '#sum' and
    the rest a scratchpad, which is right far more often: length and correctness go together."""
    from seqrl.rollout import HFSampler
    from seqrl.tasks import get_task

    task = get_task("scratchpad", digits=2, operands=3, seed=1234)
    held_out = task.examples("test", 64)
    model, tok = load_policy("builtin:tiny-scratchpad-optional")
    sampler = HFSampler(model, tok, max_new_tokens=task.max_new_tokens, temperature=1.0)
    torch.manual_seed(0)
    batch = sampler.generate([e.prompt for e in held_out], group_size=4)
    texts = tok.batch_decode(batch.response_ids, skip_special_tokens=True)
    examples = [e for e in held_out for _ in range(4)]
    direct = [t.strip().startswith("#") for t in texts]
    scores = [task.score(t, e) for t, e in zip(texts, examples, strict=True)]
    share = sum(direct) / len(direct)
    acc_direct = sum(s for s, d in zip(scores, direct, strict=True) if d) / max(1, sum(direct))
    n_worked = len(direct) - sum(direct)
    acc_worked = sum(s for s, d in zip(scores, direct, strict=True) if not d) / max(1, n_worked)
    print(f"direct share {share:.3f}, accuracy direct {acc_direct:.3f}, worked {acc_worked:.3f}")
    assert 0.6 <= share <= 0.95 and n_worked >= 10, share
    assert acc_worked >= acc_direct + 0.3, (acc_direct, acc_worked)
