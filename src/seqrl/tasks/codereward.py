"""Code answers: run the completion's program against the item's tests in the sandbox.

The program is the last fenced code block of the completion (```python ... ``` or ``` ... ```),
or the whole completion when it has none; the tests (Python statements, typically ``assert``s)
run after it in the same namespace. Score 1 when the tests ran to their end (attested by a nonce
the program never sees, not by the exit status) and the process exited 0 within every limit of
:class:`~seqrl.tasks.sandbox.SandboxLimits`, else 0, with the reason. What this can and cannot
detect is in :mod:`seqrl.tasks.sandbox`: an object whose ``__eq__`` is always true passes an
``assert f(x) == y``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from seqrl.tasks.sandbox import SandboxLimits, SandboxResult, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeScore:
    score: float
    reason: str  # "passed", "failed", "exited early", "timed out", "output limit", "no code"
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
    """Run ``extract_code(completion)`` followed by ``tests``.

    Never raises for anything in the completion; raises
    :class:`~seqrl.tasks.sandbox.SandboxUnavailableError` when this machine cannot sandbox code.
    """
    code = extract_code(completion)
    if not code.strip():
        return CodeScore(0.0, "no code", None)
    result = run_python(code, tests=tests.strip() + "\n", limits=limits)
    if result.ok:
        return CodeScore(1.0, "passed", result)
    if result.timed_out:
        return CodeScore(0.0, "timed out", result)
    if result.output_truncated:
        return CodeScore(0.0, "output limit", result)
    if result.returncode == 0:  # exit status 0 without reaching the end of the tests
        return CodeScore(0.0, "exited early", result)
    return CodeScore(0.0, "failed", result)
