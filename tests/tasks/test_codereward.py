"""Code answers scored by running them against tests in the real sandbox."""

import pytest

from seqrl.tasks.codereward import extract_code, score_code
from seqrl.tasks.sandbox import SandboxLimits

LIMITS = SandboxLimits(wall_s=2.0, cpu_s=1)
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


@pytest.mark.parametrize(
    ("completion", "score", "reason"),
    [
        ("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", 1.0, "passed"),
        ("def add(a, b):\n    return a + b", 1.0, "passed"),  # no fence: the whole text
        ("```python\ndef add(a, b):\n    return a - b\n```", 0.0, "failed"),
        ("```python\ndef add(a, b):\n    while True: pass\n```", 0.0, "timed out"),
        ("```python\nprint('x' * 10**8)\n```", 0.0, "output limit"),
        (
            "```python\nimport os\nos.system('echo hi')\ndef add(a, b): return a + b\n```",
            0.0,
            "failed",
        ),
        ("```python\n```", 0.0, "no code"),
    ],
)
def test_code_scores_with_reason(completion, score, reason):
    result = score_code(completion, TESTS, limits=LIMITS)
    assert (result.score, result.reason) == (score, reason)


def test_extract_code_prefers_the_last_python_block():
    text = "```\nnot this\n```\n```python\nfirst\n```\n```py\nsecond\n```\n```text\nlog\n```"
    assert extract_code(text) == "second\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("no fences") == "no fences"


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("x = '\ud800'\ndef add(a, b):\n    return a + b", 0.0),  # a lone surrogate: not UTF-8
        ("def add(a, b):\n    return a + b\x00", 0.0),
        ("def add(a, b):\n    return a + b  # \udcff", None),  # in a comment: Python's call
    ],
)
def test_a_completion_never_crashes_scoring(completion, score):
    result = score_code(completion, TESTS, limits=LIMITS)
    assert result.score == score if score is not None else result.score in (0.0, 1.0)
    if result.score == 0.0:
        assert result.reason == "failed" and "Error" in result.result.stderr


def test_exiting_zero_before_the_tests_is_not_a_pass():
    for code in ("import sys\nsys.exit(0)", "import atexit, os\natexit.register(os._exit, 0)"):
        result = score_code(code + "\ndef add(a, b):\n    return 0", TESTS, limits=LIMITS)
        assert result.score == 0.0 and result.reason in ("exited early", "failed"), code
