"""Which configured reward function says whether a sample is correct (1.0 = correct)."""

from __future__ import annotations

from typing import Optional, Sequence

CORRECTNESS_REWARDS = ("accuracy", "reasoning_gym")  # in order of preference


def correctness_column(names: Sequence[str]) -> Optional[int]:
    """Index of the reward function that measures correctness (accuracy or reasoning_gym), if configured."""
    for preferred in CORRECTNESS_REWARDS:
        if preferred in names:
            return list(names).index(preferred)
    return None
