"""A standard HF architecture with a locally trained BPE tokenizer, loaded through
from_pretrained like a downloaded model: the path real models take, end to end on the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqrl.models import load_policy
from seqrl.models.pretrained import ARCHITECTURES, SIZES, train_tokenizer, write_stand_in

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "examples" / "data" / "gsm8k_toy.jsonl"
TEXTS = [v for line in TOY.read_text().splitlines() for v in json.loads(line).values()]


def test_the_trained_tokenizer_is_byte_level_bpe_and_loses_no_text():
    tok = train_tokenizer(TEXTS, vocab_size=400)
    sample = "Gus has 4 marbles; ünïcode → #### 13"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == sample  # every byte is in the vocabulary
    assert len(ids) < len(sample.encode())  # merges learnt from the corpus
    assert "Ġmarbles" in tok.get_vocab()


def test_stand_in_sizes_and_shapes(tmp_path):
    out = write_stand_in(
        tmp_path / "small",
        TEXTS,
        **dict(zip(("hidden_size", "layers", "heads"), SIZES["small"], strict=True)),
    )
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 4, 4)
    assert config.intermediate_size == 4 * 128
    with pytest.raises(ValueError, match="multiple of the heads"):
        write_stand_in(tmp_path / "bad", TEXTS, hidden_size=100, heads=8)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_stand_in_loads_like_a_downloaded_model(tmp_path, architecture):
    out = write_stand_in(tmp_path / architecture, TEXTS, architecture=architecture)
    model, tok = load_policy(out)
    assert model.config.model_type == architecture
    assert type(model) is type(AutoModelForCausalLM.from_pretrained(out))
    assert type(AutoTokenizer.from_pretrained(out)).__name__ != "CharTokenizer"
    assert tok.padding_side == "left" and tok.pad_token is not None
    wrapped = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert wrapped == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    again = write_stand_in(tmp_path / "again", TEXTS, architecture=architecture)
    ids = tok(["#### 13"], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # reproducible from the seed
        assert torch.equal(model(ids).logits, load_policy(again)[0](ids).logits)


def _seqrl(*args, timeout=240):
    done = subprocess.run(
        [sys.executable, "-m", "seqrl", *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_cli_make_model_train_with_lora_and_eval_on_a_gsm8k_file(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    _seqrl("make-model", str(model_dir), "--text", str(TOY))
    sets = [
        f"model.policy={model_dir}",
        "model.lora.r=4",
        "model.gradient_checkpointing=true",
        "task.name=file",
        f"task.train_file={TOY}",
        f"task.test_file={TOY}",
        "task.columns.prompt=question",
        "task.reward=math",
        "task.chat_template=true",
        "task.eval_size=8",
        "reward.terms=[{fn: format, weight: 0.1}]",
        "rollout.max_new_tokens=16",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "train.steps=2",
        "train.eval_samples=2",
        "log.tensorboard=false",
        f"output_dir={tmp_path}",
        "name=run",
    ]
    _seqrl("train", "--no-progress", *[a for s in sets for a in ("--set", s)])
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/term/format" in r for r in rows)
    assert any("eval/pass@2" in r for r in rows)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"].startswith("<|im_start|>user\n")
    final = AutoModelForCausalLM.from_pretrained(run / "final")  # merged: plain transformers
    assert type(final).__name__ == "LlamaForCausalLM"
    results = tmp_path / "eval.jsonl"
    table = _seqrl(
        "eval",
        str(run / "final"),
        "--data",
        str(TOY),
        "--column",
        "prompt=question",
        "--chat",
        "--k",
        "2",
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
        "--out",
        str(results),
    )
    assert "pass@2" in table
    assert len(results.read_text().splitlines()) == 4
