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
  the row's other columns). The ``seqrl`` command imports modules from the working directory,
  as ``python -m`` does; from Python, a function itself may be given (:func:`function_spec`).

The same functions can be a file task's verifier (``task.reward: "my_rewards:score"``).

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


CALLABLE_PREFIX = "callable:"
"""Spec prefix of a function handed over from Python that cannot be imported by name."""

_CALLABLES: dict[str, RewardFn] = {}


def function_spec(fn: RewardFn | str) -> str:
    """The config string for the reward function ``fn`` (a string is returned as it is).

    ``"module:qualname"`` when that name imports back to ``fn``, so a run's config.yaml can load
    it again (``seqrl train --resume``); otherwise (a lambda, a closure, a function defined in the
    script being run) ``"callable:<name>"``, which this process alone can resolve.
    """
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise TypeError(f"a reward function must be callable or 'module:function', got {fn!r}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    if module and module != "__main__" and "<" not in qualname:
        spec = f"{module}:{qualname}"
        try:
            if load_function(spec) is fn:
                return spec
        except ValueError:
            pass
    spec, n = f"{CALLABLE_PREFIX}{qualname}", 1
    while _CALLABLES.get(spec, fn) is not fn:  # another function of the same name
        n += 1
        spec = f"{CALLABLE_PREFIX}{qualname}#{n}"
    _CALLABLES[spec] = fn
    return spec


def load_function(spec: str) -> RewardFn:
    """The callable named by ``"package.module:function"`` (ValueError saying what is wrong)."""
    if spec.startswith(CALLABLE_PREFIX):
        if spec not in _CALLABLES:
            raise ValueError(
                f"reward function {spec!r} was a Python function handed to another process's "
                "seqrl API; pass it again (reward=...), or define it in a module and name it "
                "'module:function' so that a config (and --resume) can import it"
            )
        return _CALLABLES[spec]
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
            f"reward function {spec!r}: cannot import module {module_name!r} ({err}); is it "
            "installed, or a .py file in the working directory (or on PYTHONPATH)?"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward function {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def checked_value(label: str, fn: RewardFn, completion: str, example) -> float:
    """``float(fn(completion, example))``, or :class:`RewardFunctionError` naming the function
    (``label``, e.g. ``"reward term 'my:f'"``) and the prompt when it raises or returns
    something that is not a finite number: a run stops rather than train on a wrong reward."""
    try:
        value = float(fn(completion, example))
    except Exception as err:
        raise RewardFunctionError(
            f"{label} failed on the prompt {example.prompt[:80]!r}: {type(err).__name__}: {err}"
        ) from err
    if not math.isfinite(value):
        raise RewardFunctionError(
            f"{label} failed on the prompt {example.prompt[:80]!r}: "
            f"it returned {value}, not a finite number"
        )
    return value


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
            value = checked_value(f"reward term {term.name!r}", term.fn, text, example)
            out[i, j] = term.weight * value
    return out
