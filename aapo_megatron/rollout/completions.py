"""Helpers over an engine's `Completion`s shared by the trainer's rollouts and the evaluation loop."""

from __future__ import annotations

from typing import Any, Sequence

from aapo_megatron.rollout.engine import Completion


def flatten(groups: list[list[Completion]]) -> list[Completion]:
    """[B][G] -> [B*G] in group-major order."""
    return [c for group in groups for c in group]


def completion_texts(tokenizer: Any, completions: Sequence[Completion]) -> list[str]:
    """Decoded completion strings (special tokens dropped)."""
    return [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
