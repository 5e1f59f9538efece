"""Extra reward terms added to the verifier's reward: a format reward and user functions.

A run's reward for one response is

    r = (1 if correct else reward.incorrect) + Σ_i weight_i · term_i(completion, example)
        (+ DAPO's soft overlong penalty when configured)

Each term is named by ``fn`` in the config's ``reward.terms`` list:

- ``"format"``: 1.0 when the task can extract a final answer from the completion (boxed,
  ``####``, "answer is", the last number, ... as the task's verifier reads it), else 0.0; it
  rewards answering in a form the verifier can check, right or wrong;
- ``"package.module:function"``: any importable function ``f(completion: str, example) -> float``
  (``example`` is a :class:`seqrl.tasks.base.Example` with ``prompt``, ``answer`` and ``meta``,
  the row's other columns).

>>> from seqrl.tasks import get_task
>>> task = get_task("addition", digits=1)
>>> terms = resolve_terms([("format", 0.5)], task)
>>> term_rewards(["7", "seven"], [task.examples("test", 1)[0]] * 2, terms).tolist()
[[0.5, 0.0]]
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

RewardFn = Callable[[str, object], float]


class RewardFunctionError(RuntimeError):
    """A reward term raised or returned a value that is not a finite number."""


@dataclass(frozen=True)
class RewardTerm:
    name: str  # "format" or "module:function", as configured
    weight: float
    fn: RewardFn


def format_reward(task) -> RewardFn:
    """1.0 when ``task.extract_answer`` finds an answer in the completion, else 0.0."""

    def fmt(completion: str, example) -> float:
        return 0.0 if task.extract_answer(completion) is None else 1.0

    return fmt


def load_function(spec: str) -> RewardFn:
    """The callable named by ``"package.module:function"`` (ValueError saying what is wrong)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r} must look like 'package.module:function' "
            "(or be the built-in 'format')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({err}); "
            "is it installed or on PYTHONPATH?"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward function {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def resolve_terms(terms: Sequence[tuple[str, float]], task) -> tuple[RewardTerm, ...]:
    """``(fn spec, weight)`` pairs → callable terms (``format`` uses ``task``'s answer parser)."""
    out = []
    for name, weight in terms:
        fn = format_reward(task) if name == "format" else load_function(name)
        out.append(RewardTerm(name, float(weight), fn))
    return tuple(out)


def term_rewards(
    completions: Sequence[str], examples: Sequence, terms: Sequence[RewardTerm]
) -> Tensor:
    """Weighted values of each term: [len(terms), B] float64 (row i is weight_i · term_i).

    A term that raises or returns something that is not a finite number stops with an error
    naming the term and the example, rather than training on a silently wrong reward.
    """
    out = torch.zeros(len(terms), len(completions), dtype=torch.float64)
    for i, term in enumerate(terms):
        for j, (text, example) in enumerate(zip(completions, examples, strict=True)):
            try:
                value = float(term.fn(text, example))
            except Exception as err:
                raise RewardFunctionError(
                    f"reward term {term.name!r} failed on the prompt {example.prompt[:80]!r}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            if not math.isfinite(value):
                raise RewardFunctionError(
                    f"reward term {term.name!r} failed on the prompt {example.prompt[:80]!r}: "
                    f"it returned {value}, not a finite number"
                )
            out[i, j] = term.weight * value
    return out
