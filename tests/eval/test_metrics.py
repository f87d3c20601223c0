"""pass@k / avg@k against hand-computed values and the binomial formula; the Wilson interval against published values."""

import math
from fractions import Fraction

import pytest

from aapo_megatron.eval.metrics import benchmark_metrics, default_ks, pass_at_k, wilson_interval


def _exact(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_computed():
    # n=5, c=2, k=2: the k-subsets with no correct sample are C(3,2)=3 of C(5,2)=10 -> 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    # n=4, c=1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6, pass@4 = 1
    assert [pass_at_k(4, 1, k) for k in (1, 2, 4)] == pytest.approx([0.25, 0.5, 1.0], abs=1e-15)
    assert pass_at_k(8, 0, 3) == 0.0
    assert pass_at_k(8, 6, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(1000, 500) ~ 2.7e299 and C(2000, 1000) overflows a double; the product form never builds them.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(float(_exact(2000, 3, 1000)), abs=1e-12)
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"pass@5 needs 1 <= k <= n \(the samples per item\), got k=5, n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(TypeError, match="integers"):
        pass_at_k(4.0, 1, 1)


def test_benchmark_metrics_on_known_correctness():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4, [True] * 4]
    m = benchmark_metrics(correct, rewards=[[1, 0, 0, 0], [1, 1, 0, 0], [0] * 4, [1] * 4], ks=[1, 2, 4],
                          lengths=[[3, 5, 7, 9]] * 4, truncated=[[False, False, False, True]] * 4)
    # per item c = 1, 2, 0, 4 of n = 4
    assert m["items"] == 4 and m["samples_per_item"] == 4
    assert m["pass@1"] == pytest.approx((0.25 + 0.5 + 0 + 1) / 4)
    assert m["pass@2"] == pytest.approx((0.5 + (1 - 1 / 6) + 0 + 1) / 4)
    assert m["pass@4"] == pytest.approx(3 / 4)
    assert m["avg@4"] == pytest.approx(7 / 16)
    assert m["reward_mean"] == pytest.approx(7 / 16)
    assert m["len_mean"] == 6 and m["truncated_frac"] == 0.25


def test_benchmark_metrics_greedy_and_errors():
    m = benchmark_metrics([[True], [False], [True]])
    assert m["pass@1"] == m["avg@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same number"):
        benchmark_metrics([[True, False], [True]])
    with pytest.raises(ValueError, match=r"1 <= k <= samples per item \(2\); got k=\[4\]"):
        benchmark_metrics([[True, False]], ks=[1, 4])
    with pytest.raises(ValueError, match="at least one item"):
        benchmark_metrics([])


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


def test_wilson_interval_matches_newcombe_1998_and_solves_the_score_equation():
    # Newcombe, Statistics in Medicine 17:857 (1998), Table I, method 3 (Wilson score, no continuity correction)
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                             (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=5e-5)
    # each end p solves |k/n - p| = z sqrt(p (1 - p) / n) (inside (0, 1))
    z = 1.959963984540054
    for k, n in ((3, 10), (41, 200), (99, 100)):
        for p in wilson_interval(k, n):
            assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson_interval(5, 4)
