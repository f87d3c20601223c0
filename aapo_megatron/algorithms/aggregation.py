"""Global token-mean loss aggregation across micro-batches and data-parallel ranks.

The AAPO/GRPO loss is sum over every completion token of the optimizer step divided by the number of those tokens
(docs/algorithms.md), not a per-micro-batch mean. Other aggregations (`algorithm.loss_aggregation`: the authors'
per-group mean, Dr. GRPO's constant) are the same global token mean of the losses times a per-sample factor
(`sample_loss_weights`), carried as `GlobalTokenMean.token_weights`. Each micro-batch contributes sum(values * mask) / T with T the
step's total token count; `grad_scale` undoes whatever averaging the framework applies on top (Megatron's DDP
averages gradients over DP ranks; its pipeline schedule divides by the number of micro-batches unless
`calculate_per_token_loss` is set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist


def count_step_tokens(
    masks: Union[torch.Tensor, Iterable[torch.Tensor]], dp_group: Optional[dist.ProcessGroup] = None
) -> float:
    """Completion tokens of the whole optimizer step: sum of all micro-batch masks on this rank, all-reduced over DP."""
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    local = torch.zeros((), dtype=torch.float64)
    for m in masks:
        local += m.detach().double().sum().cpu()
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=dp_group)
    return float(local)


@dataclass(frozen=True)
class GlobalTokenMean:
    """Turns per-token values of one micro-batch into its share of the step's global token mean."""

    num_tokens_in_step: float
    """Completion tokens in the whole optimizer step (all micro-batches, all DP ranks); see `count_step_tokens`."""
    grad_scale: float = 1.0
    """Factor that cancels framework averaging: DP size if gradients are averaged over DP, times the micro-batch
    count if the schedule divides each micro-batch loss by it; 1 when gradients are summed."""
    token_weights: Optional[torch.Tensor] = None
    """Per-token factor (shape of the mask) from `sample_loss_weights`; None = 1 (token_mean)."""

    def __post_init__(self):
        if not self.num_tokens_in_step > 0:
            raise ValueError(
                f"num_tokens_in_step must be > 0 (the step has no completion tokens?), got {self.num_tokens_in_step}"
            )

    @classmethod
    def for_step(
        cls,
        masks: Union[torch.Tensor, Iterable[torch.Tensor]],
        dp_group: Optional[dist.ProcessGroup] = None,
        *,
        grads_averaged_over_dp: bool = True,
        microbatch_divisor: int = 1,
    ) -> "GlobalTokenMean":
        """Count the step's tokens over `masks` (this rank's micro-batches) and DP, and set grad_scale to match."""
        dp = dist.get_world_size(dp_group) if dp_group is not None and dist.is_initialized() else 1
        scale = (dp if grads_averaged_over_dp else 1) * microbatch_divisor
        return cls(num_tokens_in_step=count_step_tokens(masks, dp_group), grad_scale=float(scale))

    def __call__(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum(values * mask) * grad_scale / num_tokens_in_step, a scalar in the units of `values`."""
        if values.shape != mask.shape:
            raise ValueError(f"values shape {tuple(values.shape)} and mask shape {tuple(mask.shape)} differ")
        return (values * self._weighted(mask).to(values.dtype)).sum() * (self.grad_scale / self.num_tokens_in_step)

    def coefficient(self, mask: torch.Tensor) -> torch.Tensor:
        """d(self(values, mask))/d values: mask * weights * grad_scale / num_tokens_in_step, shape of mask."""
        return self._weighted(mask).float() * (self.grad_scale / self.num_tokens_in_step)

    def _weighted(self, mask: torch.Tensor) -> torch.Tensor:
        return mask if self.token_weights is None else mask.float() * self.token_weights.to(mask.device)


AGGREGATIONS = ("token_mean", "group_token_mean", "constant")
"""Values of algorithm.loss_aggregation (docs/algorithms.md, "Loss aggregation")."""


def aggregation_name(cfg) -> str:
    """cfg.loss_aggregation (an AlgorithmConfig), or the algorithm's default: constant for dr_grpo, else token_mean."""
    if cfg.loss_aggregation is not None:
        return cfg.loss_aggregation
    return "constant" if cfg.name == "dr_grpo" else "token_mean"


def sample_loss_weights(completion_lengths: Sequence[int], indices: range, mode: str, group_size: int,
                        max_new_tokens: int) -> torch.Tensor:
    """Per-sample factor c_i [len(completion_lengths)] (0 outside `indices`) such that the global token mean of
    c_i * loss over the update's tokens is the `mode` aggregation of the update `indices` (all DP ranks).

    With T the update's token count: token_mean c = 1; group_token_mean c_i = T / (N_groups * T_g(i)) (group of
    sample i = i // group_size, counted within `indices`); constant c = T / (max_new_tokens * len(indices)).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")
    weights = torch.zeros(len(completion_lengths), dtype=torch.float64)
    idx = list(indices)
    total = float(sum(completion_lengths[i] for i in idx))
    if not idx or total == 0:
        return weights.float()
    if mode == "token_mean":
        weights[idx] = 1.0
    elif mode == "constant":
        weights[idx] = total / (float(max_new_tokens) * len(idx))
    else:
        group_tokens: dict[int, float] = {}
        for i in idx:
            group_tokens[i // group_size] = group_tokens.get(i // group_size, 0.0) + completion_lengths[i]
        for i in idx:
            t_g = group_tokens[i // group_size]
            weights[i] = total / (len(group_tokens) * t_g) if t_g > 0 else 0.0
    return weights.float()


def position_weights(sample_weights: torch.Tensor, sample_index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-position factor [shape] of a micro-batch from per-sample factors and its sample_index ([b] or [b, S],
    -1 = padding, weight 0)."""
    w = torch.where(sample_index >= 0, sample_weights[sample_index.clamp(min=0)], torch.zeros((), dtype=sample_weights.dtype))
    if w.dim() == 1:
        w = w[:, None]
    return w.expand(shape).to(torch.float32)
