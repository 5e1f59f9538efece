"""Arithmetic tasks: direct addition and multi-operand addition with a written scratchpad."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

from seqrl.tasks.base import Example, Task, _check_int, first_token


def operand_range(digits: int) -> tuple[int, int]:
    """Inclusive range of ``digits``-digit numbers (no leading zeros; 1 digit is 0-9)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


class AdditionTask(Task):
    """``"123+456="`` → ``"579"``: two uniform ``digits``-digit operands, answer given directly.

    The answer is the completion stripped and cut at the first whitespace / EOS marker, so
    ``"579"``, ``" 579\\n..."`` and ``"579 because"`` are correct; ``"0579"`` is not.
    """

    name = "addition"

    def __init__(self, digits: int = 3, seed: int = 1234) -> None:
        super().__init__(seed)
        self.digits = _check_int("digits", digits, 1, 9)
        self.lo, self.hi = operand_range(self.digits)

    @property
    def params(self) -> dict[str, Any]:
        return {"digits": self.digits, "seed": self.seed}

    @property
    def max_new_tokens(self) -> int:
        """Longest answer (digits + 1 characters) + EOS + 1 spare."""
        return self.digits + 3

    def space_size(self) -> int:
        return (self.hi - self.lo + 1) ** 2

    def make_example(self, a: int, b: int) -> Example:
        """The example for ``a + b``."""
        return Example(prompt=f"{a}+{b}=", answer=str(a + b), meta={"operands": [a, b]})

    def enumerate_problems(self) -> Iterator[Example]:
        r = range(self.lo, self.hi + 1)
        return (self.make_example(a, b) for a, b in itertools.product(r, r))

    def sample_problem(self, rng: random.Random) -> Example:
        return self.make_example(rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi))

    def extract_answer(self, completion: str) -> str | None:
        return first_token(completion) or None

    def sft_target(self, example: Example) -> str:
        return example.answer

    def slip_target(self, example: Example) -> str | None:
        """The sum with the carry out of the ones column forgotten (``"17+25="`` → ``"32"``).

        None when the ones digits do not carry (``"12+34="``): then there is nothing to forget.
        """
        a, b = example.meta["operands"]
        return str(a + b - 10) if a % 10 + b % 10 >= 10 else None


def scratchpad_lines(operands: Sequence[int]) -> list[str]:
    """One line per addition step, each split by place value (tens-and-up, then ones).

    ``[12, 34, 56]`` → ``["12+34=40+6=46", "46+56=90+12=102"]``: for ``x + y`` the line is
    ``x+y=H+O=s`` with ``H = (x - x%10) + (y - y%10)``, ``O = x%10 + y%10`` and ``s = H + O``.
    """
    lines, total = [], operands[0]
    for y in operands[1:]:
        high = (total - total % 10) + (y - y % 10)
        ones = total % 10 + y % 10
        lines.append(f"{total}+{y}={high}+{ones}={high + ones}")
        total += y
    return lines


class ScratchpadTask(Task):
    """``"12+34+56="`` → ``"12+34=40+6=46\\n46+56=90+12=102\\n#102"``.

    ``operands`` (3-5) uniform ``digits``-digit numbers (2-3) summed left to right, one
    place-value step per line, then ``#`` and the answer; targets are 31-92 characters (= tokens
    with the seqrl character tokenizer). Only the answer after the last ``#`` is verified (cut at
    the first whitespace / EOS marker); a completion without ``#`` scores 0.
    """

    name = "scratchpad"

    def __init__(self, digits: int = 2, operands: int = 4, seed: int = 1234) -> None:
        super().__init__(seed)
        self.digits = _check_int("digits", digits, 2, 3)
        self.operands = _check_int("operands", operands, 3, 5)
        self.lo, self.hi = operand_range(self.digits)

    @property
    def params(self) -> dict[str, Any]:
        return {"digits": self.digits, "operands": self.operands, "seed": self.seed}

    @property
    def max_new_tokens(self) -> int:
        """Longest possible target (all operands 9…9) + EOS + 3 spare."""
        return len(self.target_for([self.hi] * self.operands)) + 4

    def space_size(self) -> int:
        return (self.hi - self.lo + 1) ** self.operands

    def make_example(self, operands: Sequence[int]) -> Example:
        """The example for ``sum(operands)``."""
        ops = list(operands)
        return Example(
            prompt="+".join(map(str, ops)) + "=", answer=str(sum(ops)), meta={"operands": ops}
        )

    def enumerate_problems(self) -> Iterator[Example]:
        r = range(self.lo, self.hi + 1)
        return (self.make_example(ops) for ops in itertools.product(r, repeat=self.operands))

    def sample_problem(self, rng: random.Random) -> Example:
        return self.make_example([rng.randint(self.lo, self.hi) for _ in range(self.operands)])

    def extract_answer(self, completion: str) -> str | None:
        _, sep, tail = completion.rpartition("#")
        return (first_token(tail) or None) if sep else None

    @staticmethod
    def target_for(operands: Sequence[int]) -> str:
        """The scratchpad completion for ``operands``."""
        return "\n".join([*scratchpad_lines(operands), f"#{sum(operands)}"])

    def direct_target(self, completion: str) -> str | None:
        """``"12+34=40+6=46\\n46+56=90+12=102\\n#102"`` → ``"#102"``: the answer without the
        scratchpad, which the verifier accepts as well."""
        answer = self.extract_answer(completion)
        return None if answer is None else f"#{answer}"

    def sft_target(self, example: Example) -> str:
        """Built from the prompt (``"12+34+56="``), so it does not depend on ``meta``."""
        return self.target_for([int(x) for x in example.prompt.rstrip("=").split("+")])

    def slip_target(self, example: Example) -> str | None:
        """The first line whose ones carry (``O >= 10``) forgets it: ``s = H + O - 10``; the
        later lines carry on correctly from that wrong running total, so the final answer is
        10 short. None when no line's ones carry."""
        operands = [int(x) for x in example.prompt.rstrip("=").split("+")]
        lines, total, slipped = [], operands[0], False
        for y in operands[1:]:
            high = (total - total % 10) + (y - y % 10)
            ones = total % 10 + y % 10
            step = high + ones
            if ones >= 10 and not slipped:
                step, slipped = step - 10, True
            lines.append(f"{total}+{y}={high}+{ones}={step}")
            total = step
        return "\n".join([*lines, f"#{total}"]) if slipped else None
