"""Evaluation statistics over k samples per item: avg@k, unbiased pass@k, cons@k, bootstrap CIs.

For item i with n sampled completions of which c are correct:

- avg@k  = c / n, the expected accuracy of one sample (the papers' "avg@k" with n = k);
- pass@k = 1 − C(n−c, k) / C(n, k), the unbiased estimator of P(at least one of k samples is
  correct) from n ≥ k samples (Chen et al. 2021, arXiv 2107.03374, Eq. 1);
- cons@k = 1 if the most frequent parsed answer among the samples is correct (majority vote;
  ties are broken towards the answer that appeared first, and unparsable answers do not vote).

Dataset-level figures are means over items; :func:`bootstrap_ci` resamples items.
:func:`evaluate_samples` turns sampled completions into per-item records and a summary.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one item from ``n`` samples with ``c`` correct (needs k ≤ n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 − Π_{j=n−c+1}^{n} (1 − k/j): the product form of C(n−c, k)/C(n, k), stable for large n
    return 1.0 - math.prod(1.0 - k / j for j in range(n - c + 1, n + 1))


def cons_at_k(answers: Sequence[str | None], reference: str) -> float:
    """1.0 when the majority answer (unparsable ones excluded) equals ``reference``."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return 1.0 if winner == reference else 0.0


def bootstrap_ci(
    values: Sequence[float],
    *,
    stat: Callable[[Sequence[float]], float] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` (default: the mean) over items."""
    if not values:
        return (math.nan, math.nan)
    stat = stat or (lambda v: sum(v) / len(v))
    rng = random.Random(seed)
    n = len(values)
    draws = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
    lo = draws[math.floor((1 - level) / 2 * (n_boot - 1))]
    hi = draws[math.ceil((1 + level) / 2 * (n_boot - 1))]
    return (lo, hi)


def evaluate_samples(
    task,
    examples: Sequence,
    completions: Sequence[Sequence[str]],
    *,
    ks: Sequence[int],
    ci: bool = True,
) -> tuple[list[dict], dict[str, float]]:
    """Per-item records and dataset summary from ``completions[i]`` (n samples of item i).

    Summary keys: ``avg@n``, ``pass@k`` for each k in ``ks`` (k ≤ n), ``cons@n`` when the task
    parses answers, each with ``_ci_low`` / ``_ci_high`` (95% bootstrap over items) when ``ci``.
    """
    records, per_key = [], {}
    for example, samples in zip(examples, completions, strict=True):
        n = len(samples)
        scores = task.score_batch(list(samples), [example] * n)
        c = sum(1 for s in scores if s > 0)
        rec = {"prompt": example.prompt, "reference": example.answer, "n": n, "correct": c}
        rec[f"avg@{n}"] = sum(scores) / n
        for k in ks:
            rec[f"pass@{k}"] = pass_at_k(n, c, k)
        answers = [task.extract_answer(s) for s in samples]
        if any(a is not None for a in answers):
            reference = task.reference(example) if hasattr(task, "reference") else example.answer
            rec[f"cons@{n}"] = cons_at_k(answers, reference)
        rec["completions"] = list(samples)
        rec["scores"] = scores
        records.append(rec)
        for key, value in rec.items():
            if "@" in key:
                per_key.setdefault(key, []).append(value)
    summary: dict[str, float] = {}
    for key, values in per_key.items():
        summary[key] = sum(values) / len(values)
        if ci:
            summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = bootstrap_ci(values)
    return records, summary
