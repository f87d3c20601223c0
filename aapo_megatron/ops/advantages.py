"""Grouped rewards and advantages: the compiled op `torch.ops.aapo.grouped_advantages` and a pure-torch reference.

Both take per-function rewards [B*G, F] (NaN = the function does not apply; an all-NaN row sums to 0), weights [F]
and optional reference rewards, and return the same `GroupedAdvantages`. docs/algorithms.md has the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from aapo_megatron.ops._extension import load_extension

Pairing = Literal["paired", "group_mean"]
_PAIRING_CODES = {"paired": 0, "group_mean": 1}


@dataclass
class GroupedAdvantages:
    """Outputs of the grouped-advantage computation (float32 unless noted)."""

    rewards: torch.Tensor
    """[B*G] weighted reward per policy sample."""
    ref_rewards: torch.Tensor
    """[B*G_ref] weighted reward per reference sample ([0] when no reference was given)."""
    advantages: torch.Tensor
    """[B*G] advantage including the margin (when a reference was given)."""
    advantages_no_margin: torch.Tensor
    """[B*G] group-relative advantage alone."""
    group_mean: torch.Tensor
    """[B] mean reward of each group."""
    group_std: torch.Tensor
    """[B] unbiased std of each group's rewards (NaN when G == 1)."""
    zero_variance: torch.Tensor
    """[B] bool: every reward in the group is identical."""


def _as_matrix(rewards: torch.Tensor, weights: Optional[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] or [N, F] rewards plus optional [F] weights -> ([N, F] float32, [F] float32)."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {rewards.dtype}")
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(-1)
    if rewards.dim() != 2:
        raise ValueError(f"{name} must be [num_samples] or [num_samples, num_functions], got shape {tuple(rewards.shape)}")
    if weights is None:
        weights = torch.ones(rewards.size(1))
    return rewards.float(), weights.float()


def _check_args(n: int, group_size: int, scale: bool, pairing: str) -> None:
    if pairing not in _PAIRING_CODES:
        raise ValueError(f"reference_pairing must be 'paired' or 'group_mean', got {pairing!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if n % group_size != 0:
        raise ValueError(f"number of samples {n} (B*G) is not divisible by group_size G={group_size}")
    if scale and group_size == 1:
        raise ValueError(
            "group_size G=1 with std scaling: the unbiased std of a single sample is undefined; "
            "use G >= 2 or scale_rewards=False"
        )


def grouped_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: Optional[torch.Tensor] = None,
    ref_rewards: Optional[torch.Tensor] = None,
    scale: bool = True,
    eps: float = 1e-4,
    delta_low: float = 0.2,
    delta_high: float = 0.28,
    pairing: Pairing = "paired",
) -> GroupedAdvantages:
    """Compiled grouped advantages from rewards [B*G(, F)] (group-major) and optional reference rewards."""
    load_extension()
    rewards, weights = _as_matrix(rewards, weights, "rewards")
    _check_args(rewards.size(0), group_size, scale, pairing)
    ref = None
    if ref_rewards is not None:
        ref, _ = _as_matrix(ref_rewards, weights, "ref_rewards")
    out = torch.ops.aapo.grouped_advantages(
        rewards.cpu(), weights.cpu(), None if ref is None else ref.cpu(), int(group_size), float(eps), bool(scale),
        float(delta_low), float(delta_high), _PAIRING_CODES[pairing],
    )
    return GroupedAdvantages(*out)


def grouped_advantages_reference(
    rewards: torch.Tensor,
    group_size: int,
    *,
    weights: Optional[torch.Tensor] = None,
    ref_rewards: Optional[torch.Tensor] = None,
    scale: bool = True,
    eps: float = 1e-4,
    delta_low: float = 0.2,
    delta_high: float = 0.28,
    pairing: Pairing = "paired",
) -> GroupedAdvantages:
    """Pure-torch (float64) version of `grouped_advantages`, same inputs and outputs."""
    rewards, weights = _as_matrix(rewards, weights, "rewards")
    _check_args(rewards.size(0), group_size, scale, pairing)
    w = weights.double()
    r = (rewards.double() * w).nansum(dim=1)  # [B*G]; all-NaN row -> 0
    groups = r.view(-1, group_size)  # [B, G]
    mean = groups.mean(dim=1)  # [B]
    std = groups.std(dim=1, unbiased=True) if group_size > 1 else torch.full_like(mean, float("nan"))
    centred = groups - mean[:, None]
    base = centred / (std[:, None] + eps) if scale else centred  # [B, G]
    adv = base
    ref_sum = torch.zeros(0, dtype=torch.float64)
    if ref_rewards is not None:
        ref, _ = _as_matrix(ref_rewards, weights, "ref_rewards")
        ref_sum = (ref.double() * w).nansum(dim=1)
        if pairing == "paired":
            if ref_sum.numel() != r.numel():
                raise ValueError(f"paired reference needs {r.numel()} reference samples, got {ref_sum.numel()}")
            ref_value = ref_sum.view(-1, group_size)
        else:
            ref_value = ref_sum.view(groups.size(0), -1).mean(dim=1, keepdim=True)
        adv = base + (groups - ref_value).clamp(min=-delta_low, max=delta_high)
    return GroupedAdvantages(
        rewards=r.float(),
        ref_rewards=ref_sum.float(),
        advantages=adv.reshape(-1).float(),
        advantages_no_margin=base.reshape(-1).float(),
        group_mean=mean.float(),
        group_std=std.float(),
        zero_variance=(groups.amax(dim=1) == groups.amin(dim=1)),
    )
