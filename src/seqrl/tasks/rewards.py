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

What a term may return: a real number (int, float, a numpy scalar or a 0-d torch tensor; not a
bool, not a string) with ``|value| ≤`` :data:`MAX_ABS_REWARD`. Anything else stops the run with
an error naming the function, rather than training on a silently converted reward.

Time limit (``reward.timeout_s``): each call must return within it. A Python function cannot be
stopped safely from outside, so the calls run one after another in a worker thread while the
caller waits for each result with a deadline; a call past the deadline raises
:class:`RewardFunctionError` (the trainer saves a resumable checkpoint and stops) and is
abandoned: its daemon thread runs on until it returns or the process exits. A thread rather than
``signal.alarm`` because it works in any thread (notebooks, a trainer started from a thread) and
on any OS, and leaves the process's SIGALRM alone: math-verify times its own parsing with
SIGALRM and would cancel an outer alarm. The price: a function in the worker thread cannot set
signal handlers (call math-verify with ``parsing_timeout=None, timeout_seconds=None`` there), and
``timeout_s=None`` runs the calls in the caller's thread with no limit.

>>> from seqrl.tasks import get_task
>>> task = get_task("addition", digits=1)
>>> terms = resolve_terms([("format", 0.5)], task)
>>> term_rewards(["7", "seven"], [task.examples("test", 1)[0]] * 2, terms).tolist()
[[0.5, 0.0]]
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a tensor is made, so the verifiers import without it
    from torch import Tensor

RewardFn = Callable[[str, object], float]

MAX_ABS_REWARD = 1e6
"""The largest reward magnitude accepted from a reward function or verifier.

Verifiable rewards are O(1); a million leaves room for any scale a user may choose (points,
counts) while squares and sums over a batch stay far inside float32 (~3.4e38), so a runaway value
(1e300) stops the run naming its function instead of overflowing later in the update.
"""


class RewardFunctionError(RuntimeError):
    """A reward term or verifier raised, hung, or returned something that is not a usable reward."""


@dataclass(frozen=True)
class RewardTerm:
    name: str  # "format" or "module:function", as configured
    weight: float
    fn: RewardFn
    timeout_s: float | None = None  # per call; None = called in the caller's thread, no limit


def reward_value(value: object) -> float:
    """``value`` as a float when it is a usable reward, else ValueError saying what it is.

    Accepted: real numbers (int, float, ``fractions.Fraction``, numpy integer and float
    scalars) and 0-d torch tensors of an integer or float dtype, finite, with
    ``|value| ≤ MAX_ABS_REWARD``. Refused: bool (True is not a reward of 1 by accident),
    strings, containers, NaN, ±inf and anything larger.
    """
    torch = sys.modules.get("torch")  # a tensor can only come from an imported torch
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"it returned a tensor of shape {tuple(value.shape)} and dtype {value.dtype}, "
                "not a real number (return a float, or a 0-d integer or float tensor)"
            )
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):  # numpy's too
        raise ValueError(f"it returned {value!r}, a bool, not a number (return 1.0 or 0.0)")
    if not isinstance(value, numbers.Real):
        raise ValueError(
            f"it returned {value!r} ({type(value).__name__}), not a real number (return a float)"
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"it returned {out}, not a finite number")
    if abs(out) > MAX_ABS_REWARD:
        raise ValueError(
            f"it returned {out:g}, beyond the largest accepted reward magnitude "
            f"{MAX_ABS_REWARD:g} (seqrl.tasks.rewards.MAX_ABS_REWARD): rescale it"
        )
    return out


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
    """``fn(completion, example)`` as a usable reward (:func:`reward_value`), or
    :class:`RewardFunctionError` naming the function (``label``) and the prompt when it raises
    or returns something else: a run stops rather than train on a wrong reward."""
    try:
        value = fn(completion, example)
    except Exception as err:
        raise RewardFunctionError(
            f"{label} failed on the prompt {example.prompt[:80]!r}: "
            f"{type(err).__name__}: {err}{_signal_hint(err)}"
        ) from err
    try:
        return reward_value(value)
    except ValueError as bad:
        raise RewardFunctionError(
            f"{label} failed on the prompt {example.prompt[:80]!r}: {bad}"
        ) from None


def resolve_terms(
    terms: Sequence[tuple[str, float]], task, *, timeout_s: float | None = None
) -> tuple[RewardTerm, ...]:
    """``(fn spec, weight)`` pairs → callable terms (``format`` uses ``task``'s answer parser),
    each call limited to ``timeout_s`` seconds (None: no limit)."""
    out = []
    for name, weight in terms:
        fn = format_reward(task) if name == "format" else load_function(name)
        out.append(RewardTerm(name, float(weight), fn, timeout_s))
    return tuple(out)


def term_rewards(
    completions: Sequence[str], examples: Sequence, terms: Sequence[RewardTerm]
) -> Tensor:
    """Weighted values of each term: [len(terms), B] float64 (row i is weight_i · term_i).

    A term that raises, returns something that is not a usable reward (:func:`reward_value`) or
    overruns its ``timeout_s`` stops with :class:`RewardFunctionError` naming the term and the
    example, rather than training on a silently wrong reward or waiting forever.
    """
    import torch

    out = torch.zeros(len(terms), len(completions), dtype=torch.float64)
    pairs = list(zip(completions, examples, strict=True))
    calls = [(i, j) for i in range(len(terms)) for j in range(len(pairs))]
    inline = [(i, j) for i, j in calls if terms[i].timeout_s is None]
    limited = [(i, j) for i, j in calls if terms[i].timeout_s is not None]

    def fail(i: int, j: int, what: str) -> RewardFunctionError:
        prompt = pairs[j][1].prompt[:80]
        return RewardFunctionError(
            f"reward term {terms[i].name!r} failed on the prompt {prompt!r}: {what}"
        )

    def record(i: int, j: int, value: object, err: BaseException | None) -> None:
        if err is not None and not isinstance(err, Exception):
            raise err  # KeyboardInterrupt, SystemExit, ...: as if the term ran in this thread
        if err is not None:
            raise fail(i, j, f"{type(err).__name__}: {err}{_signal_hint(err)}") from err
        try:
            out[i, j] = terms[i].weight * reward_value(value)
        except ValueError as bad:
            raise fail(i, j, str(bad)) from None

    for i, j in inline:
        try:
            value, err = terms[i].fn(*pairs[j]), None
        except Exception as raised:
            value, err = None, raised
        record(i, j, value, err)
    jobs = [(terms[i].fn, pairs[j], terms[i].timeout_s) for i, j in limited]
    with contextlib.closing(_call_with_deadlines(jobs)) as outcomes:  # stops the worker on exit
        for (i, j), (value, err, late) in zip(limited, outcomes, strict=False):
            if late:
                raise fail(
                    i,
                    j,
                    f"it did not return within reward.timeout_s={terms[i].timeout_s:g} s, so "
                    "the call was abandoned (its thread runs on until the process exits); make "
                    "the function return in time (bound its loops, give its network calls a "
                    "timeout) or raise reward.timeout_s",
                )
            record(i, j, value, err)
    return out


def _signal_hint(err: BaseException) -> str:
    """What to do when a time-limited call tried to set a signal handler in its worker thread."""
    if not (isinstance(err, ValueError) and "signal only works in main thread" in str(err)):
        return ""
    return (
        " (reward calls with a time limit run in a worker thread, where signal handlers cannot "
        "be set: turn off the function's own signal-based time limits, e.g. math-verify's "
        "parsing_timeout=None and timeout_seconds=None, or set reward.timeout_s=null to call it "
        "in the main thread with no limit)"
    )


def _call_with_deadlines(
    jobs: list[tuple[RewardFn, tuple, float]],
) -> Iterator[tuple[object, BaseException | None, bool]]:
    """Run ``fn(*args)`` for each job, in order, in one daemon thread; yield each outcome as
    (value, exception or None, late) when it arrives, or (None, None, True) for the first call
    that has not returned ``timeout_s`` seconds after the previous one did (then stop).

    The thread is told to stop after its current call when the caller stops reading (a late
    call, an exception, or the generator closed); a call that never returns keeps its thread.
    """
    if not jobs:
        return
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        for fn, args, _ in jobs:
            if stop.is_set():
                return
            try:
                results.put((fn(*args), None))
            except BaseException as err:  # handed to the caller, who names the term
                results.put((None, err))

    threading.Thread(target=work, name="seqrl-reward-calls", daemon=True).start()
    try:
        for _, _, timeout_s in jobs:
            try:
                value, err = results.get(timeout=timeout_s)
            except queue.Empty:
                yield None, None, True
                return
            yield value, err, False
    finally:
        stop.set()
