"""Global token-mean loss aggregation across micro-batches and data-parallel ranks.

The AAPO/GRPO loss is sum over every completion token of the optimizer step divided by the number of those tokens
(docs/algorithms.md), not a per-micro-batch mean. Each micro-batch contributes sum(values * mask) / T with T the
step's total token count; `grad_scale` undoes whatever averaging the framework applies on top (Megatron's DDP
averages gradients over DP ranks; its pipeline schedule divides by the number of micro-batches unless
`calculate_per_token_loss` is set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

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
        return (values * mask.to(values.dtype)).sum() * (self.grad_scale / self.num_tokens_in_step)

    def coefficient(self, mask: torch.Tensor) -> torch.Tensor:
        """d(self(values, mask))/d values: mask * grad_scale / num_tokens_in_step, shape of mask."""
        return mask.float() * (self.grad_scale / self.num_tokens_in_step)
