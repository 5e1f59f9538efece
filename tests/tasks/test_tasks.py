"""seqrl.tasks: determinism, disjoint splits, exact verifiers, scratchpad targets, registry errors."""

import dataclasses
import re

import pytest

from seqrl.models import build_tokenizer
from seqrl.tasks import (
    TASKS,
    AdditionTask,
    Example,
    ScratchpadTask,
    get_task,
    split_of,
    task_params,
)
from seqrl.tasks.base import ENUMERATE_LIMIT

CONFIGS = [
    ("addition", {"digits": 2}),  # enumerated space (8,100 problems)
    ("addition", {"digits": 3}),  # sampled space (810,000 problems)
    ("scratchpad", {"digits": 2, "operands": 4}),
]


# ---- determinism and splits ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "kw"), CONFIGS)
def test_same_seed_same_examples(name, kw):
    a = get_task(name, seed=5, **kw)
    b = get_task(name, seed=5, **kw)
    c = get_task(name, seed=6, **kw)
    assert a.examples("train", 300) == b.examples("train", 300)
    assert a.examples("test", 30) == b.examples("test", 30)
    assert a.examples("train", 300) != c.examples("train", 300)
    # index order is stable: a smaller request is a prefix of a larger one (fresh instance too)
    assert get_task(name, seed=5, **kw).examples("train", 40) == a.examples("train", 300)[:40]


@pytest.mark.parametrize(("name", "kw"), CONFIGS)
def test_train_and_test_are_disjoint(name, kw):
    task = get_task(name, **kw)
    n_train = min(3000, task.max_examples("train"))
    train = task.examples("train", n_train)
    test = task.examples("test", min(300, task.max_examples("test")))
    train_p, test_p = {e.prompt for e in train}, {e.prompt for e in test}
    assert len(train_p) == len(train) and len(test_p) == len(test)  # no duplicates
    assert not train_p & test_p
    assert all(split_of(p) == "train" for p in train_p)
    assert all(split_of(p) == "test" for p in test_p)
    # the held-out split does not depend on the seed
    other = get_task(name, **{**kw, "seed": 999}).examples("test", 50)
    assert not {e.prompt for e in other} & train_p


def test_enumerated_split_sizes_are_exact():
    task = get_task("addition", digits=2)
    assert task.space_size() <= ENUMERATE_LIMIT
    n_train, n_test = task.max_examples("train"), task.max_examples("test")
    assert n_train + n_test == 90 * 90
    assert 0.07 < n_test / (n_train + n_test) < 0.13
    everything = task.examples("train", n_train) + task.examples("test", n_test)
    assert len({e.prompt for e in everything}) == 90 * 90
    with pytest.raises(ValueError, match="at most"):
        task.examples("test", n_test + 1)


def test_examples_argument_errors():
    task = get_task("addition", digits=3)
    with pytest.raises(ValueError, match="at most"):
        task.examples("train", task.max_examples("train") + 1)
    with pytest.raises(ValueError, match="unknown split"):
        task.examples("validation", 3)
    with pytest.raises(ValueError):
        task.examples("train", -1)
    assert task.examples("train", 0) == []


def test_addition_examples_are_well_formed():
    task = get_task("addition", digits=3, seed=1)
    for ex in task.examples("train", 200):
        a, b = ex.meta["operands"]
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert ex.prompt == f"{a}+{b}=" and ex.answer == str(a + b)
        assert task.sft_target(ex) == ex.answer
        assert len(task.sft_target(ex)) + 1 <= task.max_new_tokens  # + EOS
    assert task.max_new_tokens == 6 and task.name == "addition"


def test_example_is_frozen_and_hashable():
    ex = Example("1+2=", "3", {"operands": [1, 2]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.answer = "4"
    assert ex == Example("1+2=", "3") and len({ex, Example("1+2=", "3")}) == 1


# ---- verifiers -----------------------------------------------------------------------------

ADD = Example("123+456=", "579", {"operands": [123, 456]})


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("579", 1.0),
        (" 579", 1.0),
        ("579\n", 1.0),
        ("579<eos><pad>", 1.0),
        ("579 because 3+6=9", 1.0),  # extra text after the answer is ignored
        ("579\n123+1=124", 1.0),
        ("578", 0.0),
        ("0579", 0.0),
        ("5790", 0.0),
        ("57 9", 0.0),
        ("579.", 0.0),
        ("the answer is 579", 0.0),
        ("", 0.0),
        ("\n\n", 0.0),
        ("<eos>", 0.0),
        ("#579", 0.0),
    ],
)
def test_addition_verifier(completion, expected):
    task = AdditionTask(digits=3)
    assert task.score(completion, ADD) == expected
    assert task.is_correct(completion, ADD) is (expected == 1.0)


SP = Example("12+34+56=", "102", {"operands": [12, 34, 56]})
SP_TARGET = "12+34=40+6=46\n46+56=90+12=102\n#102"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (SP_TARGET, 1.0),
        (SP_TARGET + "\n", 1.0),
        (SP_TARGET + "<eos>", 1.0),
        (SP_TARGET + " and more text", 1.0),
        ("#102", 1.0),  # only the final answer is verified
        ("12+34=47\n47+56=103\n#102", 1.0),
        ("#7\n#102", 1.0),  # the last '#' wins
        ("12+34=40+6=46\n46+56=90+12=102\n#103", 0.0),
        ("12+34=40+6=46\n46+56=90+12=102\n102", 0.0),  # no '#'
        ("#102#", 0.0),
        ("# 102", 1.0),  # tolerant: stripped after '#'
        ("#", 0.0),
        ("", 0.0),
        ("#0102", 0.0),
    ],
)
def test_scratchpad_verifier(completion, expected):
    assert ScratchpadTask(digits=2, operands=3).score(completion, SP) == expected


def test_verifier_never_raises_on_malformed_input():
    for task in (AdditionTask(), ScratchpadTask()):
        for bad in [None, 5, b"579", ["579"], "\x00\xff", "#" * 500, "<unk>" * 10]:
            assert task.score(bad, ADD) == 0.0


def test_score_batch():
    task = AdditionTask(digits=3)
    examples = [ADD, Example("1+2=", "3"), Example("9+9=", "18")]
    assert task.score_batch(["579", "4", "18 "], examples) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 completions but 3 examples"):
        task.score_batch(["579", "3"], examples)


# ---- scratchpad targets --------------------------------------------------------------------

_LINE = re.compile(r"^(\d+)\+(\d+)=(\d+)\+(\d+)=(\d+)$")


def test_scratchpad_format_matches_the_documented_example():
    task = ScratchpadTask(digits=2, operands=3)
    assert task.sft_target(SP) == SP_TARGET
    assert task.is_correct(task.sft_target(SP), SP)


@pytest.mark.parametrize("digits", [2, 3])
@pytest.mark.parametrize("operands", [3, 4, 5])
def test_scratchpad_targets_are_30_to_100_tokens_and_verify(digits, operands):
    tok = build_tokenizer()
    task = get_task("scratchpad", digits=digits, operands=operands, seed=3)
    for ex in task.examples("train", 150) + task.examples("test", 20):
        target = task.sft_target(ex)
        n_tokens = len(tok(target)["input_ids"])
        assert 30 <= n_tokens <= 100
        assert n_tokens + 1 <= task.max_new_tokens <= 100  # room for EOS
        assert task.is_correct(target, ex)
        ops = ex.meta["operands"]
        assert len(ops) == operands and all(10 ** (digits - 1) <= x < 10**digits for x in ops)
        lines = target.split("\n")
        total = ops[0]
        for line, y in zip(lines[:-1], ops[1:], strict=True):  # each step is correct arithmetic
            x, y_, high, ones, s = map(int, _LINE.match(line).groups())
            assert (x, y_) == (total, y) and high + ones == s == x + y and high % 10 == 0
            total = s
        assert lines[-1] == f"#{total}" and ex.answer == str(total)


# ---- registry ------------------------------------------------------------------------------


def test_registry_and_params():
    assert set(TASKS) == {"addition", "scratchpad"}
    assert task_params("addition") == ("digits", "seed")
    assert task_params("scratchpad") == ("digits", "operands", "seed")
    task = get_task("scratchpad", digits=2, operands=4, seed=1)
    assert task.params == {"digits": 2, "operands": 4, "seed": 1}
    assert repr(task) == "ScratchpadTask(digits=2, operands=4, seed=1)"


def test_unknown_task_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown task 'additon'; did you mean 'addition'\?"):
        get_task("additon")
    with pytest.raises(ValueError, match=r"did you mean 'scratchpad'\?"):
        get_task("scrachpad", digits=2)


def test_unknown_and_bad_kwargs():
    with pytest.raises(
        ValueError, match=r"unknown argument\(s\) 'operands'.*valid arguments: digits, seed"
    ):
        get_task("addition", operands=4)
    with pytest.raises(ValueError, match=r"'digit' \(did you mean 'digits'\?\)"):
        get_task("addition", digit=3)
    for kw in [{"digits": 0}, {"digits": "3"}, {"digits": True}, {"seed": -1}]:
        with pytest.raises(ValueError):
            get_task("addition", **kw)
    for kw in [{"operands": 2}, {"operands": 6}, {"digits": 1}, {"digits": 4}]:
        with pytest.raises(ValueError):
            get_task("scratchpad", **kw)
