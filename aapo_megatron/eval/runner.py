"""Generate, score and aggregate: the evaluation loop shared by `aapo-eval` and the trainer's periodic eval.

    results = generate_and_score(engine, tokenizer, prompts, reward_pool, spec)   # [items][n] sample dicts
    metrics = held_out_metrics(engine, tokenizer, prompts, reward_pool, spec)     # trainer: eval/accuracy, ...
    run_benchmark(engine, tokenizer, reward_pool, bench, store, spec, seed, ...)  # resumable, batch by batch

A sample is correct when its correctness reward (`accuracy`, else `reasoning_gym`; math-verify for the
former) is exactly 1.0; its `reward` is the weighted sum of every configured reward function.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any, Callable, Optional, Sequence

from aapo_megatron.eval.metrics import benchmark_metrics
from aapo_megatron.rollout.completions import completion_texts, flatten
from aapo_megatron.rollout.engine import GenerationResult, SamplingSpec
from aapo_megatron.rewards.registry import correctness_column

GenerateFn = Callable[[list[list[int]], SamplingSpec], GenerationResult]


def generate_and_score(engine: Any, tokenizer: Any, prompts: Sequence[Any], reward_pool: Any, spec: SamplingSpec,
                       generate: Optional[GenerateFn] = None) -> list[list[dict[str, Any]]]:
    """spec.n completions per prompt, decoded and scored: [num_prompts][n] dicts (completion, reward, correct, ...)."""
    if not prompts:
        return []
    out = (generate or engine.generate)([list(p.input_ids) for p in prompts], spec)
    completions = flatten(out.completions)  # [B*n], prompt-major
    texts = completion_texts(tokenizer, completions)
    samples = [p.reward_sample() for p in prompts for _ in range(spec.n)]
    scored = reward_pool.score(texts, samples, num_tokens=[len(c.token_ids) for c in completions])
    col = correctness_column(scored.names)
    totals = scored.total()  # [B*n]
    results: list[list[dict[str, Any]]] = []
    for i in range(len(prompts)):
        group = []
        for j in range(spec.n):
            k = i * spec.n + j
            row = scored.rewards[k].tolist()
            group.append({
                "completion": texts[k],
                "num_tokens": len(completions[k].token_ids),
                "finish_reason": completions[k].finish_reason,
                "reward": float(totals[k]),
                "correct": None if col is None else bool(row[col] == 1.0),
                "rewards": dict(zip(scored.names, row)),
                "reward_failed": bool(scored.failed[k]),
            })
        results.append(group)
    return results


def held_out_metrics(engine: Any, tokenizer: Any, prompts: Sequence[Any], reward_pool: Any, spec: SamplingSpec,
                     generate: Optional[GenerateFn] = None) -> dict[str, float]:
    """The trainer's eval metrics on held-out prompts: eval/reward, eval/len_mean, eval/seconds, eval/accuracy."""
    t0 = time.perf_counter()
    samples = [s for group in generate_and_score(engine, tokenizer, prompts, reward_pool, spec, generate) for s in group]
    rewards = [s["reward"] for s in samples if not math.isnan(s["reward"])]
    metrics = {
        "eval/reward": sum(rewards) / len(rewards) if rewards else math.nan,
        "eval/len_mean": sum(s["num_tokens"] for s in samples) / max(1, len(samples)),
        "eval/seconds": time.perf_counter() - t0,
    }
    if samples and samples[0]["correct"] is not None:
        metrics["eval/accuracy"] = sum(s["correct"] for s in samples) / len(samples)
    return metrics


def benchmark_seed(seed: int, name: str) -> int:
    """Base sampling seed of a benchmark; item at position p is sampled with benchmark_seed + p (< 2**31)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**30)


def consecutive_runs(positions: Sequence[int], max_len: int) -> list[list[int]]:
    """Split sorted positions into runs of consecutive values, each at most max_len long."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1 and len(runs[-1]) < max_len:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def pending_positions(bench: Any, store: Any, n: int) -> list[int]:
    """Positions (into bench.prompts) of the items without all n samples in the store."""
    done = store.done(bench.spec.name, n)
    return [i for i, p in enumerate(bench.prompts) if p.row not in done]


def run_benchmark(engine: Any, tokenizer: Any, reward_pool: Any, bench: Any, store: Any, spec: SamplingSpec,
                  seed: int, batch_size: int, progress: bool = False) -> int:
    """Generate and score the benchmark's unfinished items, appending each batch to the store; returns items generated.

    Item at position p is always sampled with seed benchmark_seed(seed, name) + p, whatever the batching, so a
    resumed evaluation draws the same samples as an uninterrupted one.
    """
    from tqdm import tqdm

    name = bench.spec.name
    todo = pending_positions(bench, store, spec.n)
    base = benchmark_seed(seed, name)
    bar = tqdm(total=len(bench.prompts), initial=len(bench.prompts) - len(todo), desc=name, unit="item",
               disable=not progress, leave=True, dynamic_ncols=True)
    generated = 0
    try:
        for run in consecutive_runs(todo, batch_size):
            prompts = [bench.prompts[p] for p in run]
            batch_spec = dataclasses.replace(spec, seed=base + run[0])
            results = generate_and_score(engine, tokenizer, prompts, reward_pool, batch_spec)
            records = []
            for pos, prompt, group in zip(run, prompts, results):
                for j, sample in enumerate(group):
                    records.append({"benchmark": name, "index": prompt.row, "position": pos, "sample": j,
                                    "prompt": prompt.text, "answer": prompt.answer, **sample})
            store.append(records)
            generated += len(run)
            bar.update(len(run))
    finally:
        bar.close()
    return generated


def summarize_benchmark(bench: Any, store: Any, n: int, ks: Sequence[int]) -> dict[str, Any]:
    """Metrics of one benchmark recomputed from the store's records (so they match what responses.jsonl holds)."""
    done = store.done(bench.spec.name, n)
    items = [done[p.row] for p in bench.prompts if p.row in done]
    if not items:
        return {"items": 0.0, "missing_items": float(len(bench.prompts))}
    correct = [[bool(s["correct"]) for s in group] for group in items]
    out: dict[str, Any] = benchmark_metrics(
        correct, rewards=[[s["reward"] for s in g] for g in items], ks=ks,
        lengths=[[s["num_tokens"] for s in g] for g in items],
        truncated=[[s["finish_reason"] == "length" for s in g] for g in items])
    out["missing_items"] = float(len(bench.prompts) - len(items))
    out["reward_failures"] = float(sum(s.get("reward_failed", False) for g in items for s in g))
    return out
