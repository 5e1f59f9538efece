"""Code answers: run the completion's program against the item's tests in the sandbox.

The program is the last fenced code block of the completion (```python ... ``` or ``` ... ```),
or the whole completion when it has none; the tests (Python statements, typically ``assert``s)
run after it in the same file. Score 1 when the file exits 0 within every limit of
:class:`~seqrl.tasks.sandbox.SandboxLimits`, else 0, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from seqrl.tasks.sandbox import SandboxLimits, SandboxResult, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeScore:
    score: float
    reason: str  # "passed", "failed", "timed out", "output limit", "no code"
    result: SandboxResult | None


def extract_code(completion: str) -> str:
    """The last fenced block (a ``python``/``py`` one preferred), else the completion itself."""
    blocks = _FENCE.findall(completion)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return completion


def score_code(completion: str, tests: str, *, limits: SandboxLimits | None = None) -> CodeScore:
    """Run ``extract_code(completion)`` followed by ``tests``; never raises."""
    code = extract_code(completion)
    if not code.strip():
        return CodeScore(0.0, "no code", None)
    result = run_python(code.rstrip() + "\n\n" + tests.strip() + "\n", limits=limits)
    if result.ok:
        return CodeScore(1.0, "passed", result)
    if result.timed_out:
        return CodeScore(0.0, "timed out", result)
    if result.output_truncated:
        return CodeScore(0.0, "output limit", result)
    return CodeScore(0.0, "failed", result)
