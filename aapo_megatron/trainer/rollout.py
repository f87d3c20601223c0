"""Rank 0's half of an RL step, in three phases: sample policy and reference responses, score them, compute
the advantages.

    rollouts = collector.generate(prompts, step, metrics)      # B*G policy (+ reference) completions
    scored = collector.score(rollouts, metrics)                # the reward pool's per-function rewards
    batch = collector.advantages(rollouts, scored, metrics)    # RolloutBatch: token ids + one advantage each

The `RolloutBatch` is what the learner ranks train on; `metrics` collects the step's rollout metrics.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from aapo_megatron.algorithms import build_advantage_estimator
from aapo_megatron.config import Config
from aapo_megatron.eval.runner import held_out_metrics
from aapo_megatron.rewards.registry import correctness_column
from aapo_megatron.rollout.completions import completion_texts, flatten
from aapo_megatron.rollout.engine import Completion, RolloutEngine, SamplingSpec
from aapo_megatron.trainer.batch import RolloutBatch
from aapo_megatron.trainer.errors import EngineFailure

# Each step's sampling seed is derived from (rollout.seed, step, role), so a resumed run draws the same samples.
_POLICY_STREAM, _REFERENCE_STREAM, _EVAL_STREAM = 0, 1, 2


def _generate(engine: RolloutEngine, role: str, prompts, spec: SamplingSpec):
    """engine.generate, with any failure reported as EngineFailure naming the engine."""
    try:
        return engine.generate(prompts, spec)
    except Exception as exc:  # noqa: BLE001 - the caller decides whether to restart
        raise EngineFailure(role, exc) from exc


def step_seed(base: int, step: int, stream: int) -> int:
    """Deterministic per-step sampling seed (fits in 31 bits)."""
    return (base * 1_000_003 + step * 7_919 + stream * 104_729) % (2**31 - 1)


def sampling_spec(cfg: Config, seed: int, n: Optional[int] = None, greedy: bool = False,
                  stop_token_ids: Sequence[int] = ()) -> SamplingSpec:
    """The configured sampling parameters as a `SamplingSpec` (greedy: temperature 0, n=1)."""
    r = cfg.rollout
    return SamplingSpec(
        n=1 if greedy else (n or r.num_generations),
        temperature=0.0 if greedy else r.temperature,
        top_p=1.0 if greedy else r.top_p,
        top_k=-1 if greedy else r.top_k,
        max_tokens=r.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
        seed=seed,
        logprobs=not greedy,
    )


class RolloutCollector:
    """Generates, scores and builds the advantages for one batch of prompts (rank 0 only)."""

    def __init__(self, cfg: Config, tokenizer: Any, policy: RolloutEngine, reference: Optional[RolloutEngine],
                 reward_pool: Any, eos_token_id: int, reference_cache: Any = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.policy = policy
        self.reference = reference
        self.reward_pool = reward_pool
        self.eos = eos_token_id
        self.reference_cache = reference_cache
        self.estimator = build_advantage_estimator(cfg.algorithm)
        self._prefetch: Optional[tuple[int, list[str], futures.Future]] = None  # (step, prompt keys, job)

    # ------------------------------------------------------------------ generation
    def _reference_groups(self, prompts: Sequence[Any], step: int) -> tuple[list[list[Completion]], dict[str, float]]:
        """G reference completions per prompt (fresh from the frozen engine, or from the cache), and their timings."""
        timings: dict[str, float] = {}
        G = self.cfg.rollout.num_generations
        spec = sampling_spec(self.cfg, step_seed(self.cfg.rollout.seed, step, _REFERENCE_STREAM), n=G,
                             stop_token_ids=[self.eos])
        t0 = time.perf_counter()
        if self.cfg.algorithm.reference_rollouts == "cached":
            keys = [prompt_key(p) for p in prompts]
            groups = self.reference_cache.get_or_generate(
                keys, [p.input_ids for p in prompts], lambda ids: _generate(self.reference, "reference", ids, spec).completions, n=G)
            timings["reference/cache_size"] = float(len(self.reference_cache))
            timings["reference/cache_hits"] = float(self.reference_cache.hits)
        else:
            groups = _generate(self.reference, "reference", [p.input_ids for p in prompts], spec).completions
        timings["time/reference"] = time.perf_counter() - t0
        return groups, timings

    # ------------------------------------------------------------------ reference prefetch
    def prefetch_reference(self, prompts: Sequence[Any], step: int) -> None:
        """Start sampling step `step`'s reference responses in the background; `collect` for that step takes them.

        Exact: the reference is frozen and the samples are seeded by (rollout.seed, step), so they are the ones
        `collect(prompts, step)` would draw itself. A no-op for algorithms without reference rollouts.
        """
        if not self.estimator.uses_reference or self.reference is None:
            return
        self.wait_prefetch()
        self._prefetch = (step, [prompt_key(p) for p in prompts], in_background(self._reference_groups, prompts, step))

    def wait_prefetch(self, timeout: Optional[float] = None) -> bool:
        """Wait until a pending prefetch has finished (its result stays for `collect`); False on timeout."""
        if self._prefetch is None:
            return True
        done, _ = futures.wait([self._prefetch[2]], timeout=timeout)
        return bool(done)

    def discard_prefetch(self, timeout: Optional[float] = None) -> None:
        """Drop a pending prefetch, after waiting up to `timeout` s for it to finish (before its engine restarts)."""
        self.wait_prefetch(timeout)
        self._prefetch = None

    def _take_prefetch(self, prompts: Sequence[Any], step: int) -> Optional[futures.Future]:
        """The pending prefetch if it was started for exactly this step and these prompts, else None."""
        pending, self._prefetch = self._prefetch, None
        if pending is None:
            return None
        pending_step, keys, job = pending
        if pending_step == step and keys == [prompt_key(p) for p in prompts]:
            return job
        futures.wait([job])  # made for other prompts (cannot happen in the loop's order): finish and drop it
        return None

    def generate(self, prompts: Sequence[Any], step: int, metrics: dict[str, float]) -> "Rollouts":
        """Policy (and reference) completions for `prompts` (B Prompt objects) at RL step `step`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        spec = sampling_spec(cfg, step_seed(cfg.rollout.seed, step, _POLICY_STREAM), stop_token_ids=[self.eos])
        needs_reference = self.estimator.uses_reference
        # The reference responses depend only on the prompts, so they can be sampled before (prefetch_reference)
        # or while the policy samples.
        ref_job = self._take_prefetch(prompts, step) if needs_reference else None
        if needs_reference:
            metrics["reference/prefetched"] = float(ref_job is not None)
        if ref_job is None and needs_reference and cfg.rollout.overlap_reference:
            ref_job = in_background(self._reference_groups, prompts, step)
        try:
            policy_out = _generate(self.policy, "policy", [p.input_ids for p in prompts], spec)
        except BaseException:
            if ref_job is not None:
                futures.wait([ref_job])  # never leave a generate call running behind a failure
            raise
        metrics["time/rollout"] = time.perf_counter() - t0
        metrics["rollout/weight_version"] = float(policy_out.weight_version)
        reference: list[Completion] = []
        if needs_reference:
            t_wait = time.perf_counter()
            ref_groups, ref_timings = ref_job.result() if ref_job is not None else self._reference_groups(prompts, step)
            if ref_job is not None:
                metrics["time/reference_wait"] = time.perf_counter() - t_wait
            metrics.update(ref_timings)
            reference = flatten(ref_groups)
        return Rollouts(list(prompts), flatten(policy_out.completions), reference)

    def score(self, rollouts: "Rollouts", metrics: dict[str, float]) -> Any:
        """The reward pool's scores of the policy completions, then the reference ones (`rewards.pool.Scored`)."""
        G = self.cfg.rollout.num_generations
        policy, reference = rollouts.policy, rollouts.reference
        samples = [p.reward_sample() for p in rollouts.prompts for _ in range(G)]
        texts = completion_texts(self.tokenizer, policy + reference)
        scored = self.reward_pool.score(texts, samples + samples[: len(reference)],
                                        num_tokens=[len(c.token_ids) for c in policy + reference])
        metrics.update({k: v for k, v in scored.metrics("reward/").items() if not k.endswith("samples_per_s")})
        return scored

    def advantages(self, rollouts: "Rollouts", scored: Any, metrics: dict[str, float]) -> RolloutBatch:
        """The advantage estimator over the scores, and the RolloutBatch the learners train on."""
        G = self.cfg.rollout.num_generations
        policy, prompts = rollouts.policy, rollouts.prompts
        n = len(policy)
        rewards, ref_rewards = scored.rewards[:n], (scored.rewards[n:] if rollouts.reference else None)
        adv = self.estimator(rewards, G, weights=scored.weights, ref_rewards=ref_rewards)
        metrics.update({f"adv/{k}": v for k, v in adv.metrics().items()})
        metrics["reward/mean"] = float(adv.grouped.rewards.float().mean())
        if ref_rewards is not None:
            metrics["reward/ref_mean"] = float(adv.grouped.ref_rewards.float().mean())
        col = correctness_column(scored.names)
        if col is not None:
            metrics["train/accuracy"] = float((rewards[:, col] == 1.0).float().mean())
        lengths = torch.tensor([len(c.token_ids) for c in policy], dtype=torch.float32)
        metrics["response/len_mean"] = float(lengths.mean())
        metrics["response/len_max"] = float(lengths.max())
        metrics["response/truncated_frac"] = float(sum(c.finish_reason == "length" for c in policy) / n)
        metrics["rollout/tokens"] = float(lengths.sum())
        completions = [truncate_at_eos(c.token_ids, self.eos) for c in policy]
        return RolloutBatch(
            prompt_ids=[list(p.input_ids) for p in prompts for _ in range(G)],
            completion_ids=completions,
            advantages=adv.advantages.float(),
            rollout_logprobs=[c.logprobs[: len(ids)] for c, ids in zip(policy, completions)]
            if all(c.logprobs is not None for c in policy) else None,
        )


@dataclass
class Rollouts:
    """One step's samples on rank 0, group-major: B prompts, B*G policy and 0 or B*G reference completions."""

    prompts: list
    """The step's Prompt objects."""
    policy: list[Completion]
    """Policy completions, [B*G]."""
    reference: list[Completion]
    """Reference completions paired by index with `policy` (empty when the estimator needs none)."""


def in_background(fn: Any, *args: Any) -> futures.Future:
    """Run fn(*args) on a daemon thread (a hung engine cannot block interpreter exit); its result as a Future."""
    job: futures.Future = futures.Future()

    def run() -> None:
        try:
            job.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            job.set_exception(exc)

    threading.Thread(target=run, name="aapo-reference-rollout", daemon=True).start()
    return job


def truncate_at_eos(token_ids: Sequence[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (the completion mask)."""
    ids = list(token_ids)
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def prompt_key(prompt: Any) -> str:
    """Stable identity of a prompt for the reference cache: its token ids."""
    return ",".join(map(str, prompt.input_ids))


def evaluate(engine: RolloutEngine, tokenizer: Any, prompts: Sequence[Any], reward_pool: Any, cfg: Config,
             eos_token_id: int) -> dict[str, float]:
    """Greedy decoding on held-out prompts with aapo-eval's code; accuracy = mean correctness reward (1.0 = correct)."""
    spec = sampling_spec(cfg, seed=0, greedy=True, stop_token_ids=[eos_token_id])
    return held_out_metrics(engine, tokenizer, prompts, reward_pool, spec,
                            generate=lambda ids, s: _generate(engine, "policy", ids, s))
