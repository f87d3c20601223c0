"""Benchmark metrics from per-sample correctness: pass@k (unbiased estimator), avg@k, mean reward.

    pass_at_k(n=16, c=3, k=4)                    # one item: 1 - C(13, 4) / C(16, 4)
    benchmark_metrics(correct, rewards, ks=[1, 4])  # correct[i][j]: sample j of item i was correct
    wilson_interval(41, 200)                     # 95% interval of a proportion: (0.155, 0.267)

pass@k is the estimator of Chen et al. 2021 (Codex): with n samples of which c are correct,
1 - C(n-c, k) / C(n, k), averaged over items. It is computed as a product of ratios,
1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the (huge) binomials. avg@k is the mean
correctness over all n samples of every item (for n = 1, greedy, it equals pass@1).
The Wilson score interval (Wilson 1927) of k successes in n trials has centre (k + z^2/2) / (n + z^2)
and half-width z sqrt(k (n - k) / n + z^2 / 4) / (n + z^2); unlike the normal approximation it stays
inside [0, 1] and is not empty at k = 0 or k = n.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with n samples, c of them correct: 1 - C(n-c,k)/C(n,k), in [0, 1]."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (the samples per item), got k={k}, n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (low, high) of a proportion, successes of trials; z = 1.96 gives 95%."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs trials >= 1 and 0 <= successes <= trials, got {successes}/{trials}")
    z2 = z * z
    centre = (successes + z2 / 2) / (trials + z2)
    half = z * math.sqrt(successes * (trials - successes) / trials + z2 / 4) / (trials + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


def default_ks(n: int) -> list[int]:
    """k values reported for n samples per item: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def benchmark_metrics(correct: Sequence[Sequence[bool]], rewards: Optional[Sequence[Sequence[float]]] = None,
                      ks: Optional[Sequence[int]] = None, lengths: Optional[Sequence[Sequence[int]]] = None,
                      truncated: Optional[Sequence[Sequence[bool]]] = None) -> dict[str, float]:
    """Metrics of one benchmark from per-item sample lists (every item has the same n samples).

    Keys: items, samples_per_item, pass@k for each k, avg@n (mean correctness), and when given
    reward_mean, len_mean (tokens) and truncated_frac.
    """
    if not correct:
        raise ValueError("benchmark_metrics needs at least one item")
    n = len(correct[0])
    if n < 1 or any(len(item) != n for item in correct):
        raise ValueError(f"every item needs the same number (>= 1) of samples; got {sorted({len(i) for i in correct})}")
    ks = list(ks) if ks is not None else default_ks(n)
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k needs 1 <= k <= samples per item ({n}); got k={bad}")
    out: dict[str, float] = {"items": float(len(correct)), "samples_per_item": float(n)}
    counts = [sum(bool(x) for x in item) for item in correct]
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    out[f"avg@{n}"] = sum(counts) / (n * len(counts))
    if rewards is not None:
        flat = [float(r) for item in rewards for r in item if not math.isnan(float(r))]
        out["reward_mean"] = sum(flat) / len(flat) if flat else math.nan
    if lengths is not None:
        flat_len = [int(x) for item in lengths for x in item]
        out["len_mean"] = sum(flat_len) / len(flat_len)
    if truncated is not None:
        flat_tr = [bool(x) for item in truncated for x in item]
        out["truncated_frac"] = sum(flat_tr) / len(flat_tr)
    return out
