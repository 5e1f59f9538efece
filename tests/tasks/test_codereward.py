"""Code answers scored by running them against tests in the real sandbox."""

import pytest

from seqrl.tasks.codereward import extract_code, score_code
from seqrl.tasks.sandbox import SandboxLimits

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=3)
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
