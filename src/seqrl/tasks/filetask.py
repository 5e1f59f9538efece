"""A task whose problems come from data files and whose reward is a verifier chosen by name.

``reward="math"``: the final answer (boxed / #### / last number) against the reference answer,
with math-verify equivalence; ``"code"``: the completion's program run against the row's tests in
the sandbox; ``"exact"``: the completion's first token equals the reference exactly.

>>> task = FileTask(test="examples/data/gsm8k_toy.jsonl", columns={"prompt": "question"})
>>> task.score("... so 13.\\n#### 13", task.examples("test")[0])
1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from seqrl.tasks.base import Example, first_token, score_pairs
from seqrl.tasks.codereward import score_code
from seqrl.tasks.files import LoadReport, load_examples
from seqrl.tasks.mathreward import extract_final_answer, reference_answer, score_math
from seqrl.tasks.sandbox import SandboxLimits, check_sandbox

REWARDS = ("math", "code", "exact")
Reward = Literal["math", "code", "exact"]


class FileTask:
    """Train and/or test problems from files (see :func:`seqrl.tasks.files.load_examples`)."""

    name = "file"

    def __init__(
        self,
        train: str | Path | None = None,
        test: str | Path | None = None,
        *,
        columns: Mapping[str, str] | None = None,
        reward: Reward = "math",
        answer_mode: str = "auto",
        prompt_template: str = "{prompt}",
        max_new_tokens: int = 256,
        on_error: Literal["raise", "skip"] = "raise",
        sandbox: SandboxLimits | None = None,
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; valid: {', '.join(REWARDS)}")
        if train is None and test is None:
            raise ValueError("give a train file, a test file or both")
        if "{prompt}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        if reward == "code":  # a machine that cannot sandbox code fails here, not with 0 rewards
            check_sandbox(sandbox)
        self.reward, self.answer_mode, self.sandbox = reward, answer_mode, sandbox
        self.prompt_template, self.max_new_tokens = prompt_template, max_new_tokens
        required = ("prompt", "tests") if reward == "code" else ("prompt", "answer")
        self.reports: dict[str, LoadReport] = {}
        self._splits: dict[str, list[Example]] = {}
        for split, path in (("train", train), ("test", test)):
            if path is not None:
                rows, report = load_examples(
                    path, columns=columns, required=required, on_error=on_error
                )
                self._splits[split] = [self._templated(e) for e in rows]
                self.reports[split] = report

    def _templated(self, e: Example) -> Example:
        return dataclasses.replace(e, prompt=self.prompt_template.format(prompt=e.prompt))

    def max_examples(self, split: str) -> int:
        return len(self._splits.get(split, []))

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` (default all) problems of ``split``, in file order."""
        if split not in self._splits:
            raise ValueError(f"this task has no {split!r} file (it has: {', '.join(self._splits)})")
        rows = self._splits[split]
        if n is not None and n > len(rows):
            raise ValueError(f"split {split!r} has {len(rows)} problems, asked for {n}")
        return rows[:n] if n is not None else list(rows)

    def extract_answer(self, completion: str) -> str | None:
        """The parsed final answer (for majority voting); None for code."""
        if self.reward == "math":
            return extract_final_answer(completion, self.answer_mode)
        if self.reward == "exact":
            return first_token(completion) or None
        return None

    def reference(self, example: Example) -> str:
        return reference_answer(example.answer) if self.reward == "math" else example.answer

    def score(self, completion: str, example: Example) -> float:
        if self.reward == "math":
            return score_math(completion, example.answer, mode=self.answer_mode).score
        if self.reward == "code":
            return score_code(completion, str(example.meta["tests"]), limits=self.sandbox).score
        return 1.0 if (first_token(completion) or None) == example.answer else 0.0

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        return score_pairs(self.score, completions, examples)

    def __repr__(self) -> str:
        files = ", ".join(f"{s}={r.path}" for s, r in self.reports.items())
        return f"FileTask({files}, reward={self.reward!r})"
