"""Verifiable-reward tasks: examples, deterministic splits and exact verifiers.

Splits are disjoint by construction: a problem belongs to ``"test"`` when a fixed hash of its
prompt falls in bucket 0 of 10, else to ``"train"``. The hash does not depend on the seed, so the
held-out problems are the same for every seed. ``examples(split, n)`` returns the first ``n``
problems of a seeded shuffle of the split, so ``examples(split, n)`` is a prefix of
``examples(split, m)`` for ``n <= m``.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from seqrl.tasks.rewards import RewardFunctionError, reward_value

SPLITS: tuple[str, ...] = ("train", "test")
TEST_BUCKETS = 10
"""A problem is held out when ``hash(prompt) % TEST_BUCKETS == 0`` (10% of the space)."""

ENUMERATE_LIMIT = 200_000
"""Problem spaces up to this size are enumerated (exact split sizes); larger ones are sampled."""

_STOP = re.compile(r"\s|<eos>|<pad>|<\|endoftext\|>|<\|im_end\|>|</s>")
"""Where a parsed answer ends: whitespace or an end-of-sequence marker left in decoded text."""


@dataclass(frozen=True)
class Example:
    """One problem: the prompt given to the policy, the reference answer and task metadata.

    ``source`` says where a problem read from a file came from (``"data.jsonl, row 17"``), for
    messages; None for generated problems.
    """

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str | None = field(default=None, compare=False)


def split_of(prompt: str) -> str:
    """``"test"`` when the prompt's blake2b hash is in bucket 0 of :data:`TEST_BUCKETS`, else ``"train"``."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_BUCKETS == 0 else "train"


def first_token(text: str) -> str:
    """``text`` stripped and cut at the first whitespace or end-of-sequence marker."""
    return _STOP.split(text.strip(), maxsplit=1)[0]


def score_pairs(score, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
    """``[score(c, e) for c, e in zip(completions, examples)]``; the lengths must match.

    Every score must be a usable reward (:func:`seqrl.tasks.rewards.reward_value`: a finite real
    number, not a bool, within ``MAX_ABS_REWARD``), else RewardFunctionError naming the verifier.
    """
    if len(completions) != len(examples):
        raise ValueError(
            f"score_batch: {len(completions)} completions but {len(examples)} examples"
        )
    out = []
    for c, e in zip(completions, examples, strict=True):
        value = score(c, e)
        try:
            out.append(reward_value(value))
        except ValueError as err:
            owner = getattr(score, "__self__", None)
            name = getattr(score, "__qualname__", repr(score))
            if owner is not None:
                name = f"{type(owner).__name__}.{score.__name__}"
            raise RewardFunctionError(
                f"verifier {name} failed on the prompt {e.prompt[:80]!r}: {err}"
            ) from None
    return out


class Task(ABC):
    """Base class of seqrl tasks. Subclasses define the problem space, the target and the parser.

    Attributes: ``name`` (registry name), ``seed`` and ``max_new_tokens`` (a generation budget that
    fits every SFT target of the task plus EOS).
    """

    name: ClassVar[str]

    def __init__(self, seed: int = 1234) -> None:
        self.seed = _check_int("seed", seed, 0, None)
        self._pools: dict[str, _Pool] = {}

    # ---- subclass hooks --------------------------------------------------------------------
    @property
    @abstractmethod
    def max_new_tokens(self) -> int:
        """Generation budget (tokens) for one completion."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The constructor arguments, e.g. ``{"digits": 3, "seed": 1234}``."""

    @abstractmethod
    def space_size(self) -> int:
        """Number of distinct problems (both splits)."""

    @abstractmethod
    def enumerate_problems(self) -> Iterator[Example]:
        """Every problem once, in a fixed order (used when ``space_size() <= ENUMERATE_LIMIT``)."""

    @abstractmethod
    def sample_problem(self, rng: random.Random) -> Example:
        """One uniformly random problem."""

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The final answer parsed from a completion, or None when there is none."""

    @abstractmethod
    def sft_target(self, example: Example) -> str:
        """The full completion used for the supervised warm start (EOS is added by the SFT code)."""

    def slip_target(self, example: Example) -> str | None:
        """The completion a careless teacher writes for ``example``: the task's typical mistake.

        None when the example leaves no room for it (or the task defines none). ``seqrl sft
        --teacher-slip-rate p`` trains on these in place of the correct target with probability
        p, which makes a warm start that is systematically wrong in a way a verifier can fix.
        """
        return None

    def direct_target(self, completion: str) -> str | None:
        """``completion`` cut to its bare final answer, as the verifier accepts it; None when the
        task has no shorter form (the default).

        ``seqrl sft --direct-answer-rate p`` trains on these with probability p: a warm start
        that mostly answers without its worked steps (see :class:`ScratchpadTask`).
        """
        return None

    # ---- splits ----------------------------------------------------------------------------
    def max_examples(self, split: str) -> int:
        """The largest ``n`` accepted by :meth:`examples` for ``split``.

        Exact split size for enumerated spaces; half the expected split size for sampled spaces
        (rejection sampling of distinct problems slows down near exhaustion).
        """
        return self._pool(split).capacity

    def examples(self, split: str, n: int) -> list[Example]:
        """The first ``n`` problems of the seeded shuffle of ``split`` ("train" or "test")."""
        _check_int("n", n, 0, None)
        pool = self._pool(split)
        if n > pool.capacity:
            raise ValueError(
                f"task {self!r}: split {split!r} can give at most {pool.capacity} examples, "
                f"asked for {n}"
            )
        return pool.take(n)

    def _pool(self, split: str) -> _Pool:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if split not in self._pools:
            rng = random.Random(f"seqrl:{self.name}:{self.seed}:{split}")
            if self.space_size() <= ENUMERATE_LIMIT:
                self._pools[split] = _EnumeratedPool(self, split, rng)
            else:
                self._pools[split] = _SampledPool(self, split, rng)
        return self._pools[split]

    # ---- verification ----------------------------------------------------------------------
    def is_correct(self, completion: str, example: Example) -> bool:
        """True when the parsed answer equals ``example.answer`` exactly; never raises."""
        if not isinstance(completion, str):
            return False
        try:
            answer = self.extract_answer(completion)
        except Exception:  # a verifier must never crash a training step
            return False
        return answer is not None and answer == example.answer

    def score(self, completion: str, example: Example) -> float:
        """1.0 when :meth:`is_correct`, else 0.0."""
        return 1.0 if self.is_correct(completion, example) else 0.0

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """:meth:`score` of ``completions[i]`` against ``examples[i]``; lengths must match."""
        return score_pairs(self.score, completions, examples)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class _Pool:
    """The seeded order of one split, materialised lazily."""

    capacity: int

    def take(self, n: int) -> list[Example]:
        raise NotImplementedError


class _EnumeratedPool(_Pool):
    """All problems of the split, shuffled once."""

    def __init__(self, task: Task, split: str, rng: random.Random) -> None:
        self.items = [ex for ex in task.enumerate_problems() if split_of(ex.prompt) == split]
        rng.shuffle(self.items)
        self.capacity = len(self.items)

    def take(self, n: int) -> list[Example]:
        return self.items[:n]


class _SampledPool(_Pool):
    """Distinct problems of the split in order of first appearance in a seeded uniform stream.

    The order of first appearances of a uniform stream is a uniformly random permutation, so this
    is a seeded shuffle of the split without enumerating it.
    """

    def __init__(self, task: Task, split: str, rng: random.Random) -> None:
        self.task, self.split, self.rng = task, split, rng
        self.items: list[Example] = []
        self.seen: set[str] = set()
        share = 1 / TEST_BUCKETS if split == "test" else 1 - 1 / TEST_BUCKETS
        self.capacity = int(task.space_size() * share) // 2

    def take(self, n: int) -> list[Example]:
        while len(self.items) < n:
            ex = self.task.sample_problem(self.rng)
            if ex.prompt not in self.seen and split_of(ex.prompt) == self.split:
                self.seen.add(ex.prompt)
                self.items.append(ex)
        return self.items[:n]


def _check_int(name: str, value: Any, lo: int | None, hi: int | None) -> int:
    """``value`` if it is an int in ``[lo, hi]`` (bounds optional), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value
