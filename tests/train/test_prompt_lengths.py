"""Prompt lengths in tokens: counted as the sampler encodes them, checked against the model's
context minus the generation budget, long rows named by file and row or skipped and counted."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqrl.config import load_config
from seqrl.models import load_policy
from seqrl.tasks.base import Example
from seqrl.tasks.files import DataError
from seqrl.tasks.lengths import (
    CHARS_PER_TOKEN,
    check_prompt_lengths,
    context_length,
    prompt_limit,
    prompt_token_counts,
)
from seqrl.train import builders as B
from seqrl.train.trainer import Trainer


@pytest.fixture(scope="module")
def nano():
    return load_policy("builtin:nano")


def test_counts_are_the_samplers_and_a_huge_prompt_costs_a_prefix(nano):
    _, tok = nano
    prompts = ["12+34=", "", "Q: what is 7 times 6?\nA:", "x" * 10_000]
    counts, lower = prompt_token_counts(tok, prompts, limit=40)
    exact = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts[:3]]
    assert counts[:3] == exact and lower[:3] == [False] * 3
    # the char tokenizer: 1 token per character; only the first 32 · 41 characters are counted
    assert counts[3] == CHARS_PER_TOKEN * 41 and lower[3]


def test_a_long_prompt_of_long_tokens_is_counted_whole():
    word = "a" * 100  # one token of 100 characters: the prefix alone cannot prove it too long
    backend = Tokenizer(models.WordLevel({word: 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    prompt = " ".join([word] * 12)  # 12 tokens, 1211 characters > 32 · (10 + 1)
    assert prompt_token_counts(tok, [prompt], limit=10) == ([12], [False])
    assert prompt_token_counts(tok, [prompt], limit=12) == ([12], [False])


def test_the_limit_is_the_setting_or_the_context_minus_the_budget(nano):
    model, _ = nano
    assert context_length(model) == 256
    assert prompt_limit(None, 256, max_new_tokens=16) == (
        240,
        "the model's 256-position context minus the 16-token generation budget",
    )
    assert prompt_limit(100, 256, max_new_tokens=16) == (100, "task.max_prompt_tokens")
    assert prompt_limit(None, None, max_new_tokens=16) == (None, "")


def test_too_long_prompts_name_their_row_or_are_skipped_and_counted(nano):
    _, tok = nano
    rows = [
        Example("1+1=", "2", source="d.jsonl, row 1"),
        Example("9" * 50, "0", source="d.jsonl, row 2"),
        Example("2+2=", "4", source="d.jsonl, row 3"),
    ]
    with pytest.raises(
        DataError,
        match=r"d\.jsonl, row 2: the prompt has 50 tokens, more than the 20 allowed \(why\); shorten",
    ):
        check_prompt_lengths(rows, tok, 20, why="why", split="train")
    kept, problems = check_prompt_lengths(rows, tok, 20, why="why", split="train", on_error="skip")
    assert [e.source for e in kept] == ["d.jsonl, row 1", "d.jsonl, row 3"]
    assert len(problems) == 1 and problems[0].startswith("d.jsonl, row 2: the prompt has 50")
    generated = [Example("1" * 30, "1")]
    with pytest.raises(DataError, match="prompt 1 of the test split: the prompt has 30 tokens"):
        check_prompt_lengths(generated, tok, 20, why="why", split="test")
    with pytest.raises(DataError, match="no room for a prompt"):
        check_prompt_lengths(generated, tok, 0, why="why", split="test")


def _file_cfg(tmp_path, fast_overrides, *extra):
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 20)]
    rows[3]["prompt"] = "1+" * 500_000 + "1="  # a 1 MB row
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, load_config(
        None,
        [
            *fast_overrides,
            "task.name=file",
            f"task.train_file={path}",
            f"task.test_file={path}",
            "task.reward=exact",
            "rollout.max_new_tokens=8",
            *extra,
        ],
    )


def test_the_trainer_refuses_a_row_longer_than_the_context(tmp_path, fast_overrides):
    path, cfg = _file_cfg(tmp_path, fast_overrides)
    with pytest.raises(
        DataError,
        match=rf"{path}, row 4: the prompt has 1000002 characters \(\d+ tokens in its first "
        r"7968\), more than the 248 allowed \(the model's 256-position context minus the "
        r"8-token generation budget\); .*task.on_error=skip",
    ):
        Trainer(cfg, progress=False)


def test_skipped_long_rows_are_counted_and_max_prompt_tokens_is_the_bound(
    tmp_path, fast_overrides, nano
):
    model, tok = nano
    path, cfg = _file_cfg(tmp_path, fast_overrides, "task.on_error=skip")
    task, train, test = B.build_task_data(cfg, tok, model)
    assert (len(train), len(test)) == (9, 7) and all("1+1+" not in e.prompt for e in train)
    assert task.reports["train"].skipped == 1
    (note, _) = B.data_notes(task)
    assert note.startswith(f"train data {path}: 1 of 10 rows skipped") and "row 4" in note
    cfg = cfg.with_overrides(["task.max_prompt_tokens=5", "task.on_error=raise"])
    with pytest.raises(
        DataError,
        match=r"row 1: the prompt has 6 tokens, more than the 5 allowed \(task.max_prompt_tokens\)",
    ):
        B.build_task_data(cfg, tok, model)


def test_a_budget_that_leaves_no_room_for_a_generated_prompt(fast_overrides, nano):
    model, tok = nano
    cfg = load_config(None, [*fast_overrides, "rollout.max_new_tokens=252"])
    with pytest.raises(
        DataError, match=r"prompt 1 of the train split: .* lower rollout.max_new_tokens"
    ):
        B.build_task_data(cfg, tok, model)
