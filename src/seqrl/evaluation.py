"""Evaluation statistics over k samples per item: avg@k, unbiased pass@k, cons@k, bootstrap CIs.

For item i with n sampled completions of which c are correct:

- avg@k  = c / n, the expected accuracy of one sample (the papers' "avg@k" with n = k);
- pass@k = 1 − C(n−c, k) / C(n, k), the unbiased estimator of P(at least one of k samples is
  correct) from n ≥ k samples (Chen et al. 2021, arXiv 2107.03374, Eq. 1);
- cons@k = 1 if the most frequent parsed answer among the samples is correct (majority vote;
  ties are broken towards the answer that appeared first, and unparsable answers do not vote).

Dataset-level figures are means over items; :func:`bootstrap_ci` resamples items.
:func:`evaluate_samples` turns sampled completions into per-item records and a summary,
:func:`group_means` splits a figure by a column of the data (``task.group_by``), and
:func:`evaluate_policy` samples a model (greedy and k samples per item) and does all of it: the
code behind ``seqrl eval`` and ``seqrl.evaluate``.
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


def group_means(values: Sequence[float], examples: Sequence, key: str) -> dict[str, float]:
    """The mean of ``values[i]`` per value of ``examples[i].meta[key]``, sorted by that value.

    Examples without the column count under ``"none"``. Raises ValueError when no example has
    the column at all (a misspelt ``task.group_by``), naming the columns there are.
    """
    values = [float(v) for v in values]
    if len(values) != len(examples):
        raise ValueError(f"group_means: {len(values)} values for {len(examples)} examples")
    check_group_by(examples, key)
    groups: dict[str, list[float]] = {}
    for value, example in zip(values, examples, strict=True):
        groups.setdefault(str(example.meta.get(key, "none")), []).append(value)
    return {name: sum(v) / len(v) for name, v in sorted(groups.items())}


def check_group_by(examples: Sequence, key: str) -> None:
    """ValueError naming the data's columns when no example has the column ``key``."""
    if examples and not any(key in e.meta for e in examples):
        columns = sorted({k for e in examples for k in e.meta if k not in ("messages", "tests")})
        raise ValueError(
            f"group_by: no example has a column {key!r}; the data's other columns are "
            f"{', '.join(map(repr, columns)) or 'none'}"
        )


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


def evaluate_policy(
    policy,
    tokenizer,
    task,
    items: Sequence,
    *,
    k: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    batch_items: int = 16,
    seed: int = 0,
    group_by: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Greedy accuracy and avg@k, pass@k, cons@k of ``policy`` on ``items`` (prompts as the model
    sees them): per-item records (prompt, reference, k completions and scores, the greedy
    completion and its score) and the summary with 95% bootstrap intervals; with ``group_by``,
    also ``greedy_acc/<value>`` and ``avg@k/<value>`` per value of that column (no interval).
    ``on_batch(n)`` is called after each batch of n items (a progress bar).
    """
    import torch

    from seqrl.rollout import HFSampler

    if group_by:
        check_group_by(items, group_by)
    torch.manual_seed(seed)
    sampler = HFSampler(
        policy,
        tokenizer,
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
    prompts = [e.prompt for e in items]
    completions: list[list[str]] = []
    greedy: list[str] = []
    for s in range(0, len(items), batch_items):
        part = prompts[s : s + batch_items]
        best = sampler.generate(part, group_size=1, greedy=True)  # draws no random numbers
        greedy += tokenizer.batch_decode(best.response_ids, skip_special_tokens=True)
        batch = sampler.generate(part, group_size=k)
        texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        completions += [texts[i : i + k] for i in range(0, len(texts), k)]
        if on_batch is not None:
            on_batch(len(part))
    ks = sorted({1, k} | {x for x in (4, 8, 16, 32) if x < k})
    records, summary = evaluate_samples(task, items, completions, ks=ks)
    greedy_scores = task.score_batch(greedy, list(items))
    for rec, text, score in zip(records, greedy, greedy_scores, strict=True):
        rec["greedy"], rec["greedy_score"] = text, score
    low, high = bootstrap_ci(greedy_scores)
    summary = {
        "greedy_acc": sum(greedy_scores) / max(1, len(items)),
        "greedy_acc_ci_low": low,
        "greedy_acc_ci_high": high,
        **summary,
    }
    if group_by:
        avg = [rec[f"avg@{k}"] for rec in records]
        for name, acc in group_means(greedy_scores, items, group_by).items():
            summary[f"greedy_acc/{name}"] = acc
        for name, acc in group_means(avg, items, group_by).items():
            summary[f"avg@{k}/{name}"] = acc
    return records, summary
