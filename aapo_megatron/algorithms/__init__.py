"""Advantage estimators and policy losses, each registered under its config name (ADVANTAGE_ESTIMATORS: aapo,
grpo, dr_grpo, rloo; POLICY_LOSSES: aapo_ce, grpo_clip, sft_ce). Importing the package registers them all."""

from aapo_megatron.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AAPOAdvantage,
    AdvantageEstimator,
    AdvantageResult,
    DrGRPOAdvantage,
    GRPOAdvantage,
    build_advantage_estimator,
)
from aapo_megatron.algorithms.aggregation import GlobalTokenMean, count_step_tokens
from aapo_megatron.algorithms.losses import (
    POLICY_LOSSES,
    AAPOCrossEntropyLoss,
    GRPOClipLoss,
    LossOutput,
    PolicyLoss,
    PolicyLossInputs,
    SFTCrossEntropyLoss,
    build_policy_loss,
    default_loss_name,
)
from aapo_megatron.algorithms.rloo import RLOOAdvantage
from aapo_megatron.algorithms.step import policy_loss_from_logits

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AAPOAdvantage",
    "AAPOCrossEntropyLoss",
    "AdvantageEstimator",
    "AdvantageResult",
    "DrGRPOAdvantage",
    "GRPOAdvantage",
    "GRPOClipLoss",
    "GlobalTokenMean",
    "LossOutput",
    "POLICY_LOSSES",
    "PolicyLoss",
    "PolicyLossInputs",
    "RLOOAdvantage",
    "SFTCrossEntropyLoss",
    "build_advantage_estimator",
    "build_policy_loss",
    "count_step_tokens",
    "default_loss_name",
    "policy_loss_from_logits",
]
