"""Advantage estimators: the base class, and aapo (group advantage + clamped margin to the reference), grpo,
dr_grpo. rloo lives in rloo.py: a new estimator is one registered file.

Each estimator is built from `AlgorithmConfig` and maps rewards of B groups of G samples (group-major, optionally
per reward function [B*G, F] with weights [F]) to per-sample advantages [B*G] plus metrics. Where it is
registered it declares its default policy loss, whether it samples the reference, and its config checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch

from aapo_megatron.algorithms.registry import ADVANTAGE_ESTIMATORS
from aapo_megatron.errors import BadInputError
from aapo_megatron.ops.advantages import GroupedAdvantages, grouped_advantages, grouped_advantages_reference

if TYPE_CHECKING:
    from aapo_megatron.config import AlgorithmConfig

Backend = Literal["compiled", "reference"]


@dataclass
class AdvantageResult:
    """Advantages of one batch and the quantities behind them (see `GroupedAdvantages`)."""

    advantages: torch.Tensor
    """[B*G] per-sample advantage used by the loss."""
    grouped: GroupedAdvantages
    """Rewards, group stats, advantage without the margin, zero-variance flags."""

    def metrics(self) -> dict[str, float]:
        """Scalars for logging: zero-variance group fraction, mean |A| with and without the margin, rewards."""
        g = self.grouped
        out = {
            "zero_variance_group_fraction": g.zero_variance.float().mean().item(),
            "mean_abs_advantage": self.advantages.abs().mean().item(),
            "mean_abs_advantage_no_margin": g.advantages_no_margin.abs().mean().item(),
            "reward_mean": g.rewards.mean().item(),
            "reward_std": g.rewards.std().item() if g.rewards.numel() > 1 else 0.0,
        }
        if g.ref_rewards.numel() > 0:
            out["ref_reward_mean"] = g.ref_rewards.mean().item()
            out["margin_mean"] = (self.advantages - g.advantages_no_margin).mean().item()
        return out


class AdvantageEstimator:
    """Base: rewards [B*G(, F)] -> AdvantageResult. Subclasses set `uses_reference` and the grouped-op options."""

    name: str = ""
    default_loss: str = "aapo_ce"
    """The policy loss (a POLICY_LOSSES name) used when algorithm.loss is unset."""
    uses_reference: bool = False
    """True when the estimator needs reference-model rewards (it then generates reference rollouts)."""

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse a run Config this estimator cannot work with (BadInputError naming the key); none by default."""

    def __init__(self, cfg: "AlgorithmConfig", backend: Backend = "compiled"):
        if backend not in ("compiled", "reference"):
            raise ValueError(f"backend must be 'compiled' or 'reference', got {backend!r}")
        self.cfg = cfg
        self.backend = backend

    def scale(self) -> bool:
        """Whether the group-centred reward is divided by the group std."""
        return self.cfg.scale_rewards

    def __call__(
        self,
        rewards: torch.Tensor,
        group_size: int,
        *,
        weights: Optional[torch.Tensor] = None,
        ref_rewards: Optional[torch.Tensor] = None,
    ) -> AdvantageResult:
        """Advantages [B*G] from rewards [B*G] or [B*G, F] (group-major), weights [F], reference rewards likewise."""
        if self.uses_reference and ref_rewards is None:
            raise ValueError(
                f"advantage estimator {self.name!r} needs reference rewards (ref_rewards) for its margin term"
            )
        fn = grouped_advantages if self.backend == "compiled" else grouped_advantages_reference
        out = fn(
            rewards,
            group_size,
            weights=weights,
            ref_rewards=ref_rewards if self.uses_reference else None,
            scale=self.scale(),
            eps=self.cfg.eps,
            delta_low=self.cfg.delta_low,
            delta_high=self.cfg.delta_high,
            pairing=self.cfg.reference_pairing,
        )
        return AdvantageResult(advantages=out.advantages, grouped=out)


def require_group_size(cfg: Any, minimum: int, reason: str, condition: str = "") -> None:
    """BadInputError naming rollout.num_generations (of run Config `cfg`) unless it is >= `minimum`."""
    g = cfg.rollout.num_generations
    if g < minimum:
        raise BadInputError(f"'rollout.num_generations' must be >= {minimum}{condition} ({reason}; "
                            f"algorithm={cfg.algorithm.name}), got {g}")


class _StdScaledAdvantage(AdvantageEstimator):
    """Shared check of the estimators that divide by the group std when algorithm.scale_rewards is on."""

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.algorithm.scale_rewards:
            require_group_size(cfg, 2, "the group std of one sample is undefined",
                               " when algorithm.scale_rewards is on")


@ADVANTAGE_ESTIMATORS.register("aapo")
class AAPOAdvantage(_StdScaledAdvantage):
    """A_i = (r_i - mean) / (std + eps) + clamp(r_i - r'_i, -delta_low, delta_high) (docs/algorithms.md)."""

    default_loss = "aapo_ce"
    uses_reference = True


@ADVANTAGE_ESTIMATORS.register("grpo")
class GRPOAdvantage(_StdScaledAdvantage):
    """A_i = (r_i - mean) / (std + eps) (or r_i - mean with scale_rewards off); no reference."""

    default_loss = "grpo_clip"


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
class DrGRPOAdvantage(AdvantageEstimator):
    """A_i = r_i - mean: Dr. GRPO never divides by the group std (scale_rewards is ignored)."""

    default_loss = "grpo_clip"

    def scale(self) -> bool:
        return False


def build_advantage_estimator(cfg: "AlgorithmConfig", backend: Backend = "compiled") -> AdvantageEstimator:
    """The estimator registered as `cfg.name` (aapo, grpo, dr_grpo, rloo, ...)."""
    return ADVANTAGE_ESTIMATORS.get(cfg.name)(cfg, backend)
