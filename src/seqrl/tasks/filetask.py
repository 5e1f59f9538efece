"""A task whose problems come from data files and whose reward is a verifier chosen by name.

``reward="math"``: the final answer (boxed / #### / last number) against the reference answer,
with math-verify equivalence; ``"code"``: the completion's program run against the row's tests in
the sandbox; ``"exact"``: the completion stripped of surrounding whitespace and cut at the first
whitespace or end-of-sequence marker, equal to the reference character for character (case and
punctuation count); ``"package.module:function"`` (or a Python callable): your own verifier
``f(completion: str, example) -> float``, whose value is the response's score.

A task with a train file and no test file holds out the rows whose prompt hashes into the test
bucket (:func:`seqrl.tasks.base.split_of`, about 10%), the rule the built-in tasks use: the
held-out rows are the same in every run, whatever the row order or the seed.

>>> task = FileTask(test="examples/data/gsm8k_toy.jsonl", columns={"prompt": "question"})
>>> task.score("... so 13.\\n#### 13", task.examples("test")[0])
1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from seqrl.tasks.base import Example, first_token, score_pairs, split_of
from seqrl.tasks.codereward import score_code
from seqrl.tasks.files import LoadReport, load_examples
from seqrl.tasks.mathreward import extract_final_answer, reference_answer, score_math
from seqrl.tasks.prompts import with_template
from seqrl.tasks.rewards import (
    RewardTerm,
    checked_value,
    function_spec,
    load_function,
    term_rewards,
)
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
        reward: Reward | str | Callable[[str, Example], float] = "math",
        answer_mode: str = "auto",
        prompt_template: str = "{prompt}",
        max_new_tokens: int = 256,
        on_error: Literal["raise", "skip"] = "raise",
        sandbox: SandboxLimits | None = None,
        train_split: str | None = None,
        test_split: str | None = None,
        subset: str | None = None,
        hold_out: bool = False,
        reward_timeout_s: float | None = None,
    ) -> None:
        self.verifier = None  # a user's function, when the reward is one
        self.reward_timeout_s = reward_timeout_s  # each call of a user's function, at most
        if callable(reward):
            reward = function_spec(reward)
        if reward not in REWARDS:
            if ":" not in str(reward):
                raise ValueError(
                    f"unknown reward {reward!r}; valid: {', '.join(REWARDS)}, or your own "
                    "function as 'module:function'"
                )
            self.verifier = load_function(reward)
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
        for split, path, name in (("train", train, train_split), ("test", test, test_split)):
            if path is not None:
                rows, report = load_examples(
                    path,
                    columns=columns,
                    required=required,
                    on_error=on_error,
                    split=name,
                    subset=subset,
                    default_split=split,
                )
                self._splits[split] = [with_template(e, prompt_template) for e in rows]
                self.reports[split] = report
        if hold_out and test is None and train is not None:
            rows = self._splits["train"]
            self._splits = {
                s: [e for e in rows if split_of(e.prompt) == s] for s in ("train", "test")
            }
            self.reports["test"] = self.reports["train"]
            for s in ("train", "test"):
                if not self._splits[s]:
                    raise ValueError(
                        f"{train}: none of its {len(rows)} rows falls in the {s} split when a "
                        "tenth is held out by prompt hash; give task.test_file as well"
                    )

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
        """The parsed final answer (for majority voting); None for code and user verifiers."""
        if self.reward == "math":
            return extract_final_answer(completion, self.answer_mode)
        if self.reward == "exact":
            return first_token(completion) or None
        return None

    def reference(self, example: Example) -> str:
        return reference_answer(example.answer) if self.reward == "math" else example.answer

    def sft_target(self, example: Example) -> str:
        """The demonstration: the row's ``completion`` (or final assistant turn), else its answer."""
        return str(example.meta.get("completion") or example.answer)

    def slip_target(self, example: Example) -> str | None:
        return None  # no typical mistake is known for a file's problems

    def score(self, completion: str, example: Example) -> float:
        if self.verifier is not None:
            return checked_value(
                f"reward function {self.reward!r}", self.verifier, completion, example
            )
        if self.reward == "math":
            return score_math(completion, example.answer, mode=self.answer_mode).score
        if self.reward == "code":
            return score_code(completion, str(example.meta["tests"]), limits=self.sandbox).score
        return 1.0 if (first_token(completion) or None) == example.answer else 0.0

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        if self.verifier is not None:  # checked and time-limited as a reward term is
            term = RewardTerm(str(self.reward), 1.0, self.verifier, self.reward_timeout_s)
            return term_rewards(completions, examples, (term,))[0].tolist()
        return score_pairs(self.score, completions, examples)

    def __repr__(self) -> str:
        files = ", ".join(f"{s}={r.path}" for s, r in self.reports.items())
        return f"FileTask({files}, reward={self.reward!r})"
