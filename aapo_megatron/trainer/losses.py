"""Bridge from a micro-batch's vocab-parallel logits to the configured policy loss (algorithms/) via the fused op.

The returned loss is the token SUM of the micro-batch (GlobalTokenMean with a unit
normaliser); Megatron's `calculate_per_token_loss` divides by the step's token count.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from aapo_megatron.algorithms.aggregation import GlobalTokenMean, position_weights
from aapo_megatron.algorithms.losses import KL_METRIC, POLICY_LOSSES, PolicyLossInputs, k3_kl
from aapo_megatron.algorithms.step import policy_loss_from_logits
from aapo_megatron.config import AlgorithmConfig
from aapo_megatron.trainer.batch import MicroBatch
from aapo_megatron.trainer.train_step import MicroBatchLoss

# Sums, not means: the schedule divides by the token count of the whole step.
_TOKEN_SUM = GlobalTokenMean(num_tokens_in_step=1.0)


def mismatch_sums(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rollout-vs-trainer log-prob mismatch on sampled tokens: token sum and max of |logp - logp_rollout|."""
    diff = (logp.detach().float() - rollout_logp.float()).abs() * mask  # [b, S]
    return {"mismatch/mean": diff.sum(), "mismatch/abs_max": diff.max() if diff.numel() else diff.sum()}


def build_loss_fn(loss_name: str, cfg: AlgorithmConfig, track_mismatch: bool = False,
                  on_policy: bool = True, fused: bool = True, temperature: float = 1.0,
                  sample_weights: Optional[torch.Tensor] = None) -> MicroBatchLoss:
    """The micro-batch loss for `loss_name` (aapo_ce, grpo_clip, sft_ce) with the algorithm's settings.

    on_policy: the weights equal the sampling weights (first update of a step), so a ratio loss uses
    ratio 1; later updates of the same step use the rollout engine's log-probs as the old policy.
    temperature: log-probs of softmax(logits / temperature) (`algorithms.temperature.logprob_temperature`).
    sample_weights: [num samples of the RolloutBatch] factors of the loss aggregation
    (`algorithms.aggregation.sample_loss_weights`); None = token_mean.
    """
    policy_loss = POLICY_LOSSES.get(loss_name)(cfg)

    def loss_fn(logits: torch.Tensor, mb: MicroBatch, tp_group: Optional[dist.ProcessGroup]):
        old_logp = None if on_policy or not policy_loss.needs_old_logp else mb.rollout_logprobs
        inputs = PolicyLossInputs(advantages=mb.advantages, mask=mb.loss_mask, old_logp=old_logp,
                                  ref_logp=mb.ref_logprobs if policy_loss.needs_ref_logp else None)
        norm = _TOKEN_SUM
        if sample_weights is not None:
            norm = GlobalTokenMean(1.0, token_weights=position_weights(sample_weights, mb.sample_index,
                                                                       mb.loss_mask.shape))
        out = policy_loss_from_logits(policy_loss, logits, mb.targets, inputs, norm, tp_group=tp_group,
                                      fused=fused, temperature=temperature)
        metrics = {k: v for k, v in out.metrics.items() if k != "loss"}
        if mb.ref_logprobs is not None and KL_METRIC not in metrics and out.logp is not None:
            metrics[KL_METRIC] = (k3_kl(out.logp.float(), mb.ref_logprobs) * mb.loss_mask).sum()  # reference_kl only
        if track_mismatch and mb.rollout_logprobs is not None and getattr(out, "logp", None) is not None:
            metrics.update(mismatch_sums(out.logp, mb.rollout_logprobs, mb.loss_mask))
        return out.loss, metrics

    return loss_fn


def update_loss_settings(cfg, batch, indices: range, loss_name: str) -> tuple[float, Optional[torch.Tensor]]:
    """(log-prob temperature, per-sample aggregation factors or None) for one update over `indices` of a
    RolloutBatch (every DP rank holds the whole batch, so the factors need no communication); cfg is a Config."""
    from aapo_megatron.algorithms.aggregation import aggregation_name, sample_loss_weights
    from aapo_megatron.algorithms.temperature import logprob_temperature

    if loss_name == "sft_ce":
        return 1.0, None
    mode = aggregation_name(cfg.algorithm)
    weights = None
    if mode != "token_mean":
        weights = sample_loss_weights([len(c) for c in batch.completion_ids], indices, mode,
                                      cfg.rollout.num_generations, cfg.rollout.max_new_tokens)
    return logprob_temperature(cfg), weights


def loss_name_for(cfg: AlgorithmConfig) -> str:
    """The configured policy loss name (the algorithm's default when `algorithm.loss` is unset)."""
    from aapo_megatron.algorithms.losses import default_loss_name

    return default_loss_name(cfg)


__all__ = ["build_loss_fn", "loss_name_for", "mismatch_sums", "update_loss_settings"]
