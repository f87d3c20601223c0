"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

Each sample is compared with the mean reward of the other G - 1 samples of its group:

    A_i = r_i - (1 / (G - 1)) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean_g)

No std scaling and no reference. The default loss is aapo_ce, the advantage-weighted cross-entropy
-A * log pi (plain REINFORCE); algorithm.loss=grpo_clip adds the PPO ratio clip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from aapo_megatron.algorithms.advantages import AdvantageEstimator, AdvantageResult, require_group_size
from aapo_megatron.algorithms.registry import ADVANTAGE_ESTIMATORS


@ADVANTAGE_ESTIMATORS.register("rloo")
class RLOOAdvantage(AdvantageEstimator):
    """A_i = r_i - mean_{j != i} r_j over the group (G >= 2); algorithm.scale_rewards is ignored."""

    default_loss = "aapo_ce"
    uses_reference = False

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        require_group_size(cfg, 2, "the leave-one-out baseline needs another sample in the group")

    def scale(self) -> bool:
        return False

    def __call__(self, rewards: torch.Tensor, group_size: int, *, weights: Optional[torch.Tensor] = None,
                 ref_rewards: Optional[torch.Tensor] = None) -> AdvantageResult:
        """Advantages [B*G] from rewards [B*G] or [B*G, F] (group-major) and weights [F]; ref_rewards unused."""
        if group_size < 2:
            raise ValueError(f"rloo needs a group size >= 2 (leave-one-out baseline), got {group_size}")
        centred = super().__call__(rewards, group_size, weights=weights)  # r_i - mean_g (no std, no margin)
        adv = centred.advantages * (group_size / (group_size - 1))
        grouped = dataclasses.replace(centred.grouped, advantages=adv, advantages_no_margin=adv)
        return AdvantageResult(advantages=adv, grouped=grouped)
