"""Rewards: a registry of reward functions (accuracy, format, cosine_length, reasoning_gym) and a worker pool.

`RewardPool(cfg.reward).score(completions, samples)` returns per-function rewards [N, F] plus weights [F]
for the grouped-advantage op. The pool (and torch) load lazily so that reward workers stay light.
"""

from aapo_megatron.rewards import functions  # noqa: F401  (registers the built-ins; imports only the registry)
from aapo_megatron.rewards.extract import completion_answer, gold_answer, last_boxed, last_tagged
from aapo_megatron.rewards.registry import (
    RewardError,
    RewardFn,
    RewardInput,
    correctness_column,
    correctness_rewards,
    register_reward,
    registered_rewards,
    resolve_reward,
)

__all__ = [
    "RewardError", "RewardFn", "RewardInput", "RewardPool", "RewardResult", "completion_answer", "correctness_column",
    "correctness_rewards", "gold_answer",
    "last_boxed", "last_tagged", "register_reward", "registered_rewards", "resolve_reward",
]


def __getattr__(name: str):
    if name in ("RewardPool", "RewardResult"):
        from aapo_megatron.rewards import pool

        return getattr(pool, name)
    raise AttributeError(f"module 'aapo_megatron.rewards' has no attribute {name!r}")
