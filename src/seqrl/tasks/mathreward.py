"""Math answers: extract the final answer of a completion and check it against the reference.

Extraction (``mode="auto"`` tries these in order): the last ``\\boxed{...}`` (braces balanced),
the text after the last ``####`` (GSM8K), the number after "the answer is", the last number.
Equivalence: an exact match after light normalisation (spaces, thousands separators, trailing
``.0``), else symbolic/numeric equivalence by math-verify (``pip install 'seqrl[math]'``) under
its time limits. Pathological answers (longer than ``max_chars`` or nested deeper than
``max_depth``) score 0 before any parsing, so a policy cannot stall training with them.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)
MODES = ("auto", "boxed", "gsm8k", "last_number", "final_line")


@dataclass(frozen=True)
class MathScore:
    score: float
    reason: str  # "exact", "equivalent", "different", "no answer", "too long", ...
    predicted: str | None


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; else None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else None


def extract_final_answer(text: str, mode: str = "auto") -> str | None:
    """The final answer of ``text`` by ``mode`` (see the module docstring), or None."""
    if mode not in MODES:
        raise ValueError(f"unknown answer extraction mode {mode!r}; valid: {', '.join(MODES)}")
    if mode in ("auto", "boxed") and (boxed := last_boxed(text)) is not None:
        return boxed
    if mode in ("auto", "gsm8k") and "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    if mode == "final_line":
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return lines[-1] if lines else None
    if mode in ("auto", "last_number"):
        if mode == "auto" and (m := _ANSWER_IS.findall(text)):
            return m[-1]
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    return None


def reference_answer(text: str) -> str:
    """The reference's final answer: after ``####`` or inside ``\\boxed{}`` if present, else all."""
    if "####" in text or "\\boxed{" in text or "\\fbox{" in text:
        return extract_final_answer(text, "auto") or text.strip()
    return text.strip()


def _normalise(answer: str) -> str:
    s = answer.strip().strip("$").strip().rstrip(".")
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


def _decimal(answer: str) -> Decimal | None:
    """The value of a plain decimal numeral (``-1,234.50``), None for anything else."""
    s = _normalise(answer)
    return Decimal(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else None


def _depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth -= 1
    return deepest


def score_math(
    completion: str,
    reference: str,
    *,
    mode: str = "auto",
    timeout_s: int = 2,
    max_chars: int = 200,
    max_depth: int = 12,
) -> MathScore:
    """1.0 when the completion's final answer equals the reference's; never raises or hangs."""
    predicted = extract_final_answer(completion, mode)
    if predicted is None:
        return MathScore(0.0, "no answer", None)
    if len(predicted) > max_chars:
        return MathScore(0.0, "too long", predicted[:max_chars])
    if _depth(predicted) > max_depth:
        return MathScore(0.0, "too deeply nested", predicted)
    gold = reference_answer(reference)
    if _normalise(predicted) == _normalise(gold):
        return MathScore(1.0, "exact", predicted)
    a, b = _decimal(predicted), _decimal(gold)
    if a is not None and b is not None:  # two plain numbers: equal values or different, no parser
        return (
            MathScore(1.0, "equal value", predicted)
            if a == b
            else MathScore(0.0, "different", predicted)
        )
    try:
        from math_verify import parse, verify
    except ImportError:
        return MathScore(0.0, "different (install seqrl[math] for equivalence)", predicted)
    # math-verify's time limits use SIGALRM, which only the main thread may set
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        same = verify(
            parse(f"${gold}$", parsing_timeout=timeout),
            parse(f"${predicted}$", parsing_timeout=timeout),
            timeout_seconds=timeout,
        )
    except Exception:  # a verifier must never crash a training step
        return MathScore(0.0, "unparsable", predicted)
    return (
        MathScore(1.0, "equivalent", predicted) if same else MathScore(0.0, "different", predicted)
    )
