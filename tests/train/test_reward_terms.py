"""Extra reward terms: the format reward, user functions by "module:function", their errors."""

import json
import math
import signal
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from seqrl.config import ConfigError, load_config
from seqrl.tasks import AdditionTask, get_task
from seqrl.tasks.base import Example
from seqrl.tasks.filetask import FileTask
from seqrl.tasks.rewards import (
    MAX_ABS_REWARD,
    RewardFunctionError,
    RewardTerm,
    load_function,
    resolve_terms,
    reward_value,
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


# --------------------------------------------------------------------------- what a term may return

ACCEPTED = [
    (0.5, 0.5),
    (-3, -3.0),
    (np.float32(0.25), 0.25),
    (np.int64(2), 2.0),
    (torch.tensor(0.75), 0.75),
    (torch.tensor(4, dtype=torch.int32), 4.0),
    (Fraction(1, 4), 0.25),
    (-MAX_ABS_REWARD, -MAX_ABS_REWARD),
]
REFUSED = [
    ("0.5", r"'0\.5' \(str\), not a real number"),
    (True, "True, a bool, not a number"),
    (np.bool_(False), "a bool, not a number"),
    (torch.tensor(True), "dtype torch.bool"),
    (torch.tensor([0.5, 0.5]), r"shape \(2,\)"),
    (None, r"None \(NoneType\), not a real number"),
    ([1.0], r"\[1\.0\] \(list\)"),
    (1e300, r"1e\+300, beyond the largest accepted reward magnitude 1e\+06"),
    (-2e6, "beyond the largest"),
    (math.inf, "inf, not a finite number"),
    (math.nan, "nan, not a finite number"),
]


@pytest.mark.parametrize(("value", "expected"), ACCEPTED)
def test_real_numbers_are_accepted_as_rewards(value, expected):
    assert reward_value(value) == expected and type(reward_value(value)) is float


@pytest.mark.parametrize("timeout_s", [None, 5.0])  # in the caller's thread, and in the worker
@pytest.mark.parametrize(("value", "message"), REFUSED)
def test_a_term_returning_no_real_number_stops_naming_itself(value, message, timeout_s):
    term = RewardTerm("myrewards:odd", 1.0, lambda completion, example: value, timeout_s)
    with pytest.raises(
        RewardFunctionError, match=rf"'myrewards:odd' failed on the prompt '1\+2=': .*{message}"
    ):
        term_rewards(["3"], [Example("1+2=", "3")], [term])


def test_a_verifier_returning_no_real_number_is_named():
    class Sloppy(AdditionTask):
        def score(self, completion, example):
            return completion == example.answer  # a bool, not a reward

    task = Sloppy(digits=1)
    ex = task.examples("test", 1)[0]
    with pytest.raises(RewardFunctionError, match=r"verifier Sloppy\.score .* True, a bool"):
        task.score_batch([ex.answer], [ex])
    assert AdditionTask(digits=1).score_batch([ex.answer, "x"], [ex, ex]) == [1.0, 0.0]


def test_reward_values_in_the_config_are_bounded_too():
    with pytest.raises(
        ConfigError,
        match=r"reward.terms\[0\].weight: Input should be less than or equal to 1000000",
    ):
        load_config(None, ["reward.terms=[{fn: format, weight: 1e300}]"])
    with pytest.raises(ConfigError, match=r"reward.incorrect"):
        load_config(None, ["reward.incorrect=-1e7"])
    assert load_config(None, []).reward.timeout_s == 60.0
    assert load_config(None, ["reward.timeout_s=null"]).reward.timeout_s is None


# --------------------------------------------------------------------------- time limit


def test_a_hanging_term_stops_at_its_time_limit_naming_itself():
    release, calls = threading.Event(), []

    def hang(completion, example):
        calls.append(completion)
        if completion == "hang":
            release.wait(60)
        return 1.0

    term = RewardTerm("myrewards:hang", 2.0, hang, timeout_s=0.3)
    ex = Example("1+2=", "3")
    assert term_rewards(["a", "b"], [ex, ex], [term]).tolist() == [[2.0, 2.0]]
    t0 = time.perf_counter()
    try:
        with pytest.raises(
            RewardFunctionError,
            match=r"'myrewards:hang' failed on the prompt '1\+2=': it did not return within "
            r"reward.timeout_s=0.3 s, so the call was abandoned",
        ):
            term_rewards(["a", "hang", "c", "d"], [ex] * 4, [term])
        assert time.perf_counter() - t0 < 10
    finally:
        release.set()  # let the abandoned call return
    time.sleep(0.2)
    time.sleep(0.5)
    assert calls == ["a", "b", "a", "hang"]  # the worker stopped after the abandoned call


def test_time_limited_calls_run_in_a_worker_thread_where_signals_cannot_be_set():
    def alarmed(completion, example):  # what math-verify's own time limits do
        old = signal.signal(signal.SIGALRM, signal.getsignal(signal.SIGALRM))
        signal.signal(signal.SIGALRM, old)
        return 1.0

    ex = Example("1+2=", "3")
    with pytest.raises(RewardFunctionError, match=r"worker thread.*reward.timeout_s=null"):
        term_rewards(["3"], [ex], [RewardTerm("m:alarmed", 1.0, alarmed, timeout_s=5.0)])
    assert term_rewards(["3"], [ex], [RewardTerm("m:alarmed", 1.0, alarmed)]).tolist() == [[1.0]]


def test_a_reward_function_hanging_mid_run_stops_with_everything_saved(fast_overrides, user_module):
    cfg = _cfg(
        fast_overrides,
        f"reward.terms=[{{fn: '{user_module}:mentions_answer'}}]",
        "reward.timeout_s=0.5",
        "train.steps=3",
        "train.checkpoint_every=0",
    )
    trainer = Trainer(cfg, progress=False)
    assert trainer.sampling_settings.reward_terms[0].timeout_s == 0.5
    calls, release = {"n": 0}, threading.Event()

    def stuck(completion, example):  # works for the first two steps' 16 rows, then hangs
        calls["n"] += 1
        if calls["n"] > 32:
            release.wait(60)
        return 0.0

    object.__setattr__(trainer.sampling_settings.reward_terms[0], "fn", stuck)
    try:
        with pytest.raises(
            TrainingAbortedError,
            match=r"myrewards:mentions_answer.*did not return within reward.timeout_s=0.5 s"
            r"[\s\S]*after step 2[\s\S]*--resume",
        ):
            trainer.fit()
    finally:
        release.set()
    latest = ckpt.load_latest(trainer.run_dir / "checkpoints")
    assert latest is not None and latest.step == 2
