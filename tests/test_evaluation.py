"""pass@k against its combinatorial definition and brute-force enumeration; cons@k; bootstrap."""

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seqrl.evaluation import bootstrap_ci, cons_at_k, pass_at_k


def _pass_at_k_enumerated(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of the n samples that contain a correct one (the definition)."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 4), (8, 1, 8)])
def test_pass_at_k_equals_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12)


@given(st.integers(1, 200), st.data())
def test_pass_at_k_matches_binomial_formula(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-9)


def test_pass_at_1_is_the_accuracy_and_errors_are_clear():
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)


def test_cons_at_k_majority_vote():
    assert cons_at_k(["12", "13", "12", None], "12") == 1.0
    assert cons_at_k(["13", "13", "12"], "12") == 0.0
    assert cons_at_k(["12", "13"], "12") == 1.0  # tie: the first answer seen wins
    assert cons_at_k(["13", "12"], "12") == 0.0
    assert cons_at_k([None, None], "12") == 0.0


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_items():
    small = [1.0, 0.0] * 10
    large = [1.0, 0.0] * 500
    lo_s, hi_s = bootstrap_ci(small, seed=1)
    lo_l, hi_l = bootstrap_ci(large, seed=1)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    assert bootstrap_ci([0.7] * 30) == pytest.approx((0.7, 0.7))
