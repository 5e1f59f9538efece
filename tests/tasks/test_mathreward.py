"""Math answers: extraction and equivalence, table-driven with the expected score and reason;
pathological answers score 0 quickly."""

import sys
import time

import pytest

from seqrl.tasks.mathreward import extract_final_answer, last_boxed, reference_answer, score_math

CASES = [
    # completion, reference, score, reason
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0, "equivalent"),
    ("\\boxed{2\\sqrt{2}}", "\\boxed{\\sqrt{8}}", 1.0, "equivalent"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0, "equivalent"),
    ("We get 22 - 9 = 13.\n#### 13", "22 - 9 = 13\n#### 13", 1.0, "exact"),
    ("The answer is 1,234.", "1234", 1.0, "exact"),
    ("x = 3, then y = 5", "5", 1.0, "exact"),
    ("answer: 12.0", "12", 1.0, "exact"),
    ("\\boxed{7}", "8", 0.0, "different"),
    ("#### 007", "7", 1.0, "equal value"),
    ("#### -0.0", "0", 1.0, "equal value"),
    ("\\boxed{9^{9^{9^{9}}}}", "9^{9^{9^{9}}}+1", 0.0, "different"),
    ("no numbers here", "3", 0.0, "no answer"),
    ("\\boxed{" + "(" * 40 + "1" + ")" * 40 + "}", "1", 0.0, "too deeply nested"),
    ("\\boxed{" + "9" * 500 + "}", "1", 0.0, "too long"),
]


@pytest.mark.parametrize(("completion", "reference", "score", "reason"), CASES)
def test_math_scores_with_reason(completion, reference, score, reason):
    start = time.perf_counter()
    result = score_math(completion, reference)
    assert (result.score, result.reason) == (score, reason)
    assert time.perf_counter() - start < 5.0


def test_plain_numbers_are_compared_by_value_without_the_parser(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if math-verify were missing
    assert score_math("#### 52", "13") == score_math("#### 52", "13.0")
    assert score_math("#### 52", "13").reason == "different"
    assert score_math("#### 13.00", "13").score == 1.0
    assert score_math("\\boxed{1/2}", "0.5").reason.startswith("different (install seqrl[math]")


def test_extraction_modes():
    text = "First 3, then \\boxed{4}.\nSo 5\n#### 6"
    assert extract_final_answer(text, "boxed") == "4"
    assert extract_final_answer(text, "gsm8k") == "6"
    assert extract_final_answer(text, "last_number") == "6"
    assert extract_final_answer(text, "final_line") == "#### 6"
    assert extract_final_answer("no answer", "boxed") is None
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert reference_answer("work...\n#### 72") == "72" and reference_answer(" 3/4 ") == "3/4"
    with pytest.raises(ValueError, match="unknown answer extraction mode"):
        extract_final_answer("1", "nope")


def test_hostile_answers_never_raise_or_hang():
    for bad in [
        "\\boxed{" + "{" * 5000 + "}",
        "\\boxed{\\frac{",
        "\\boxed{}" * 1000,
        "\x00\\boxed{1/0}",
    ]:
        start = time.perf_counter()
        assert score_math(bad, "1").score == 0.0
        assert time.perf_counter() - start < 5.0
