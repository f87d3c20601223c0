"""Fault-injecting reward functions for the pool tests, loaded in workers as "tests.rewards.faults:<fn>"."""

import os
import sys

from aapo_megatron.rewards import RewardInput


def crash_on_request(x: RewardInput) -> float:
    """Kills its worker process (exit code 7) when the completion says "CRASH"; else 1.0."""
    if x.completion == "CRASH":
        os._exit(7)
    return 1.0


def raise_on_request(x: RewardInput) -> float:
    """Raises ValueError when the completion says "RAISE"; else 2.0."""
    if x.completion == "RAISE":
        raise ValueError("asked to raise")
    return 2.0


def inf_on_request(x: RewardInput) -> float:
    """+inf / -inf when the completion says "INF" / "-INF", NaN for "NAN" (does not apply); else 3.0."""
    return {"INF": float("inf"), "-INF": float("-inf"), "NAN": float("nan")}.get(x.completion, 3.0)


def torch_imported(x: RewardInput) -> float:
    """1.0 if torch is loaded in this process (reward workers should stay light)."""
    return 1.0 if "torch" in sys.modules else 0.0


NOT_CALLABLE = 3


def fails_to_warm_up(x: RewardInput) -> float:
    """Never runs: its warmup raises, so the worker cannot start."""
    return 0.0


def _broken_warmup() -> None:
    raise RuntimeError("model file missing")


fails_to_warm_up.warmup = _broken_warmup
