"""Compiled CPU ops (torch.ops.aapo.*) with autograd wrappers, and their pure-torch reference versions."""

from aapo_megatron.ops.advantages import GroupedAdvantages, grouped_advantages, grouped_advantages_reference
from aapo_megatron.ops.logprob import (
    combine_shard_stats,
    finalize_stats,
    fused_logprob_loss,
    logprob_reference,
    shard_stats_reference,
    vocab_parallel_logprob,
)

__all__ = [
    "GroupedAdvantages",
    "combine_shard_stats",
    "finalize_stats",
    "fused_logprob_loss",
    "grouped_advantages",
    "grouped_advantages_reference",
    "logprob_reference",
    "shard_stats_reference",
    "vocab_parallel_logprob",
]
