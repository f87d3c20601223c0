"""Rollout-vs-trainer log-prob mismatch: how far vLLM's sampled-token log-probs are from the learner's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class LogprobMismatch:
    """Mean and max |logp_rollout - logp_trainer| over the completion tokens, nats."""

    mean: float
    """Token-mean absolute difference (0 when there are no tokens)."""
    max: float
    """Largest absolute difference (0 when there are no tokens)."""
    num_tokens: int
    """Tokens compared."""

    def metrics(self, prefix: str = "mismatch/") -> dict[str, float]:
        """{prefix+'mean', prefix+'max'} for the metrics log."""
        return {f"{prefix}mean": self.mean, f"{prefix}max": self.max}


@torch.no_grad()
def logprob_mismatch(rollout_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> LogprobMismatch:
    """Mismatch over tokens where mask is set; all three [B, T] (or any equal shape), log-probs in nats."""
    if rollout_logprobs.shape != trainer_logprobs.shape or mask.shape != rollout_logprobs.shape:
        raise ValueError(f"logprob_mismatch: shapes differ: rollout {tuple(rollout_logprobs.shape)}, "
                         f"trainer {tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return LogprobMismatch(0.0, 0.0, 0)
    diff = (rollout_logprobs.double() - trainer_logprobs.detach().double()).abs()[m]  # [n]
    if not torch.isfinite(diff).all():
        bad = int((~torch.isfinite(diff)).sum())
        raise ValueError(f"logprob_mismatch: {bad} of {n} masked tokens have non-finite log-probs")
    return LogprobMismatch(float(diff.mean()), float(diff.max()), n)


def pad_logprobs(rows: Sequence[Sequence[float]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-completion log-prob lists -> (values [B, length] fp32, mask [B, length] bool), right-padded."""
    values = torch.zeros(len(rows), length, dtype=torch.float32)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        k = min(len(row), length)
        values[i, :k] = torch.tensor(list(row[:k]), dtype=torch.float32)
        mask[i, :k] = True
    return values, mask
