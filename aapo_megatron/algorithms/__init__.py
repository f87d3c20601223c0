"""Advantage estimators and policy losses, each registered under its config name (ADVANTAGE_ESTIMATORS: aapo,
grpo, dr_grpo, rloo; POLICY_LOSSES: aapo_ce, grpo_clip, sft_ce; `algorithms/registry.py`).

The names below are re-exported lazily (PEP 562): config validation imports the torch-free
`algorithms.temperature`, and Slurm's resolve_config.py runs that on a login node's python without torch.
Any name asked for here first imports every module that registers, so the registries are always complete.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "advantages": ("ADVANTAGE_ESTIMATORS", "AAPOAdvantage", "AdvantageEstimator", "AdvantageResult",
                   "DrGRPOAdvantage", "GRPOAdvantage", "build_advantage_estimator"),
    "aggregation": ("GlobalTokenMean", "count_step_tokens"),
    "losses": ("POLICY_LOSSES", "AAPOCrossEntropyLoss", "GRPOClipLoss", "LossOutput", "PolicyLoss",
               "PolicyLossInputs", "SFTCrossEntropyLoss", "build_policy_loss", "default_loss_name"),
    "rloo": ("RLOOAdvantage",),
    "step": ("policy_loss_from_logits",),
}
_REGISTERING = ("advantages", "rloo", "losses")
"""The modules whose import fills ADVANTAGE_ESTIMATORS and POLICY_LOSSES (a new estimator adds its module here)."""
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """The re-exported `name`, imported from its home module on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'aapo_megatron.algorithms' has no attribute {name!r}")
    for module in _REGISTERING:  # whatever is asked for, the registries are complete
        importlib.import_module(f"aapo_megatron.algorithms.{module}")
    return getattr(importlib.import_module(f"aapo_megatron.algorithms.{_MODULE_OF[name]}"), name)
