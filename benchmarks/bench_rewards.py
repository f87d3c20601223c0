"""Reward throughput: 1k responses scored by RewardPool with 1 and 2 workers (and in-process for reference).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rewards.py [--n 1000] [--workers 1,2] [--repeats 2]

Responses look like R1-style math completions (a few hundred characters of reasoning, then a boxed
answer in one of several equivalent or wrong forms), each with a distinct ground truth so that
math-verify's caches do not short-cut the work. Worker start-up is excluded (the pool is warm).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from aapo_megatron.config import RewardConfig
from aapo_megatron.rewards import RewardInput, RewardPool, resolve_reward


def make_batch(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """n (completion, sample) pairs with mixed answer forms, ~1/3 wrong."""
    rng = random.Random(seed)
    completions, samples = [], []
    for i in range(n):
        p, q = rng.randint(1, 999), rng.randint(2, 97)
        forms = [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{p}}}{{{q}}}"]
        if p % q == 0 or q in (2, 4, 5, 8, 10, 20, 25, 40, 50):
            forms.append(f"{p / q:g}")
        answer = rng.choice(forms) if rng.random() < 0.66 else f"\\frac{{{p + 1}}}{{{q}}}"
        reasoning = " ".join(rng.choice(["Let", "us", "divide", f"{p}", "by", f"{q}", "then", "simplify", "the",
                                         "fraction", "so", "we", "get"]) for _ in range(rng.randint(40, 160)))
        completions.append(f"<think>\n{reasoning}\n</think>\n<answer>\nThe answer is $\\boxed{{{answer}}}$\n</answer>")
        samples.append({"answer": f"\\frac{{{p}}}{{{q}}}" if i % 2 else f"#### {p}/{q}"})
    return completions, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="responses per measurement")
    ap.add_argument("--functions", default="accuracy,format,cosine_length", help="comma-separated reward functions")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=2, help="batches per setup (fresh answers each); the best is shown")
    args = ap.parse_args()
    functions = {name: 1.0 for name in args.functions.split(",")}
    # Repeat r uses the same batch in every setup; no setup has seen it before (math-verify caches parses).
    batches = [make_batch(args.n, seed=100 + r) for r in range(args.repeats)]
    warm_c, warm_s = make_batch(50, seed=1)

    rows = []
    cfg = RewardConfig(functions=functions, timeout_s=30.0)
    fns = [resolve_reward(n) for n in functions]
    for c, s in zip(warm_c, warm_s):  # import and warm math-verify in this process too
        [fn(RewardInput(c, s, cfg)) for fn in fns]
    times = []
    for completions, samples in batches:
        t0 = time.perf_counter()
        for c, s in zip(completions, samples):
            [fn(RewardInput(c, s, cfg)) for fn in fns]
        times.append(time.perf_counter() - t0)
    rows.append(("in-process (no timeout)", min(times)))

    for workers in (int(w) for w in args.workers.split(",")):
        cfg = RewardConfig(functions=functions, num_workers=workers, timeout_s=30.0)
        with RewardPool(cfg) as pool:
            pool.wait_ready()
            pool.score(warm_c, warm_s)
            times = []
            for completions, samples in batches:
                result = pool.score(completions, samples)
                assert not result.failed.any(), result.messages
                times.append(result.elapsed_s)
            rows.append((f"RewardPool, {workers} worker{'s' if workers > 1 else ''}", min(times)))

    base = rows[1][1]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.n} responses x {len(functions)} functions ({', '.join(functions)}), best of {args.repeats}; "
          f"{os.cpu_count()} CPUs, load average {load}")
    print(f"{'setup':<28}{'seconds':>9}{'responses/s':>13}{'rewards/s':>11}{'vs 1 worker':>13}")
    for name, secs in rows:
        print(f"{name:<28}{secs:>9.2f}{args.n / secs:>13.0f}{args.n * len(functions) / secs:>11.0f}{base / secs:>12.2f}x")


if __name__ == "__main__":
    main()
