"""Extra reward terms: the format reward, user functions by "module:function", their errors."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from seqrl.config import load_config
from seqrl.tasks import get_task
from seqrl.tasks.base import Example
from seqrl.tasks.filetask import FileTask
from seqrl.tasks.rewards import (
    RewardFunctionError,
    load_function,
    resolve_terms,
    term_rewards,
)
from seqrl.train import checkpoint as ckpt
from seqrl.train.sampling import SamplingSettings, shaped_rewards
from seqrl.train.trainer import Trainer, TrainingAbortedError

GSM8K_TOY = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k_toy.jsonl"


def test_format_reward_is_one_exactly_when_the_task_parses_an_answer():
    task = FileTask(test=GSM8K_TOY, columns={"prompt": "question"}, reward="math")
    ex = task.examples("test", 1)[0]
    (term,) = resolve_terms([("format", 0.25)], task)
    texts = ["so \\boxed{7}", "I do not know", "", "#### 12"]
    parsed = [task.extract_answer(t) is not None for t in texts]
    assert parsed == [True, False, False, True]  # what the verifier reads, right or wrong
    got = term_rewards(texts, [ex] * 4, [term])
    assert got.dtype == torch.float64 and got.shape == (1, 4)
    assert got.tolist() == [[0.25, 0.0, 0.0, 0.25]]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        textwrap.dedent(
            """
            import math

            def brevity(completion, example):
                return -len(completion) / 10

            def mentions_answer(completion, example):
                return float(example.answer in completion)

            def boom(completion, example):
                raise KeyError("no such column")

            def nan(completion, example):
                return math.nan

            not_callable = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myrewards"


def test_user_functions_are_weighted_and_summed_per_term(user_module):
    task = get_task("addition", digits=1)
    a, b = Example("1+2=", "3"), Example("4+4=", "8")
    terms = resolve_terms(
        [(f"{user_module}:brevity", 2.0), (f"{user_module}:mentions_answer", 0.5)], task
    )
    got = term_rewards(["3", "12345"], [a, b], terms)
    # hand-worked: brevity = −len/10 × 2; mentions_answer = (answer in text) × 0.5
    assert torch.allclose(got, torch.tensor([[-0.2, -1.0], [0.5, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "must look like 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("myrewards:missing", "has no 'missing'"),
        ("myrewards:not_callable", "is not callable"),
    ],
)
def test_bad_function_specs_say_what_is_wrong(user_module, spec, message):
    with pytest.raises(ValueError, match=message):
        load_function(spec)


@pytest.mark.parametrize(
    ("fn", "message"), [("boom", "KeyError: 'no such column'"), ("nan", "not a finite")]
)
def test_a_failing_term_names_itself_and_the_prompt(user_module, fn, message):
    task = get_task("addition", digits=1)
    terms = resolve_terms([(f"{user_module}:{fn}", 1.0)], task)
    with pytest.raises(RewardFunctionError, match=rf"myrewards:{fn}.*'1\+2='.*{message}"):
        term_rewards(["3"], [Example("1+2=", "3")], terms)


def test_shaped_rewards_add_terms_to_the_verifier_and_overlong_penalty():
    s = SamplingSettings(
        group_size=2,
        prompts_per_step=1,
        max_new_tokens=10,
        incorrect_reward=-1.0,
        overlong_buffer=4,
        overlong_penalty_factor=1.0,
    )
    correct = torch.tensor([True, False, True])
    lengths = torch.tensor([3, 3, 8])  # the third is 2 tokens into the 4-token buffer: −0.5
    terms = torch.tensor([[0.1, 0.1, 0.0], [0.0, -0.3, 0.2]], dtype=torch.float64)
    got = shaped_rewards(correct, lengths, s, terms)
    assert torch.allclose(got, torch.tensor([1.1, -1.2, 0.7]))
    assert torch.equal(
        shaped_rewards(correct, lengths, s, terms[:0]), shaped_rewards(correct, lengths, s)
    )


def _cfg(fast_overrides, *extra):
    return load_config(None, [*fast_overrides, "train.steps=2", *extra])


def test_training_logs_each_term_and_adds_it_to_the_reward(fast_overrides, user_module):
    cfg = _cfg(
        fast_overrides,
        f"reward.terms=[{{fn: format, weight: 0.5}}, {{fn: '{user_module}:brevity', weight: 1.0}}]",
    )
    assert [t.fn for t in cfg.reward.terms] == ["format", "myrewards:brevity"]
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    assert load_config(trainer.run_dir / "config.yaml") == cfg  # what --resume reads back
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 2
    for r in steps:
        fmt, brev = r["reward/term/format"], r["reward/term/myrewards:brevity"]
        assert 0.0 <= fmt <= 0.5 and brev < 0  # the nano model always writes something
        assert r["reward/mean"] == pytest.approx(r["train/accuracy"] + fmt + brev, abs=1e-6)


def test_a_reward_function_failing_mid_run_stops_with_everything_saved(fast_overrides, user_module):
    cfg = _cfg(
        fast_overrides,
        f"reward.terms=[{{fn: '{user_module}:mentions_answer'}}]",
        "train.steps=3",
        "train.checkpoint_every=0",
    )
    trainer = Trainer(cfg, progress=False)
    calls = {"n": 0}

    def flaky(completion, example):  # works for the first two steps' 16 rows, then breaks
        calls["n"] += 1
        if calls["n"] > 32:
            raise ValueError("database went away")
        return 0.0

    object.__setattr__(trainer.sampling_settings.reward_terms[0], "fn", flaky)
    with pytest.raises(
        TrainingAbortedError, match=r"database went away[\s\S]*after step 2[\s\S]*--resume"
    ):
        trainer.fit()
    latest = ckpt.load_latest(trainer.run_dir / "checkpoints")
    assert latest is not None and latest.step == 2
