"""Sequence parallelism and activation recompute: the Megatron TransformerConfig options that cut activation memory.

    overrides = model_config_overrides(cfg.parallel, cfg.trainer)    # {'sequence_parallel': ..., 'recompute_*': ...}
    model = build_policy(spec, dtype=..., config_overrides=overrides)
    multiple = sequence_multiple(tp_size, sequence_parallel)          # every micro-batch length S is a multiple

`trainer.recompute` maps onto Megatron's own options (no recompute code here):

- none:      recompute_granularity=None (every activation is kept for the backward);
- selective: recompute_granularity='selective', recompute_modules=`trainer.recompute_modules`
             (default ['core_attn']: the core attention, i.e. the [b, heads, S, S] scores and probabilities of
             Megatron's DotProductAttention; with torch SDPA or TE's fused attention these are not stored anyway,
             so add 'mlp' there to save memory);
- full:      recompute_granularity='full', recompute_method=`trainer.recompute_method` (uniform: checkpoint every
             `recompute_num_layers` layers as a unit; block: recompute the first `recompute_num_layers` layers of
             each pipeline stage), keeping only each unit's input.
"""

from __future__ import annotations

import math
from typing import Any, Optional

RECOMPUTE_MODES = ("none", "selective", "full")
# Megatron's selective recompute modules that apply to the dense models built here. Its others: moe_act, moe,
# shared_experts and mla_up_proj need MoE or multi-latent attention; layernorm runs through Megatron's
# CheckpointWithoutOutput, which needs Transformer Engine (NameError FP8GlobalStateManager without it), and the TE
# layer spec fuses both norms into the following linear layers (IdentityOp norms), so it recomputes nothing there.
DENSE_RECOMPUTE_MODULES = ("core_attn", "mlp")
BASE_SEQ_MULTIPLE = 8  # micro-batch lengths are rounded up to this (see trainer/batch.py)


def validate_recompute(trainer: Any, num_layers: Optional[int] = None, pp_size: int = 1) -> None:
    """ConfigError naming the trainer.recompute* key that Megatron would refuse (num_layers: the model's, if known)."""
    from aapo_megatron.config import ConfigError

    mode = trainer.recompute
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"'trainer.recompute' must be one of {list(RECOMPUTE_MODES)}, got {mode!r}")
    if mode == "selective":
        modules = list(trainer.recompute_modules)
        bad = [m for m in modules if m not in DENSE_RECOMPUTE_MODULES]
        if not modules or bad:
            raise ConfigError(f"'trainer.recompute_modules' must be a non-empty subset of "
                              f"{list(DENSE_RECOMPUTE_MODULES)} with trainer.recompute=selective "
                              f"(unknown or MoE/MLA-only: {bad}), got {modules!r}")
    if mode == "full":
        if trainer.recompute_method not in ("uniform", "block"):
            raise ConfigError(f"'trainer.recompute_method' must be 'uniform' or 'block' with trainer.recompute=full, "
                              f"got {trainer.recompute_method!r}")
        n = trainer.recompute_num_layers
        per_stage = num_layers // pp_size if num_layers else None
        if not isinstance(n, int) or n < 1 or (per_stage is not None and n > per_stage):
            bound = f"between 1 and the layers per pipeline stage ({per_stage})" if per_stage else ">= 1"
            raise ConfigError(f"'trainer.recompute_num_layers' must be {bound} with trainer.recompute=full, got {n!r}")


def recompute_options(trainer: Any) -> dict[str, Any]:
    """TransformerConfig kwargs for `trainer.recompute` (see the module docstring)."""
    validate_recompute(trainer)
    mode = trainer.recompute
    if mode == "none":
        return {"recompute_granularity": None}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(trainer.recompute_modules)}
    return {"recompute_granularity": "full", "recompute_method": trainer.recompute_method,
            "recompute_num_layers": trainer.recompute_num_layers}


def model_config_overrides(parallel: Any, trainer: Any) -> dict[str, Any]:
    """TransformerConfig kwargs from the run config: `parallel.sequence_parallel` and the recompute options."""
    return {"sequence_parallel": bool(parallel.sequence_parallel), **recompute_options(trainer)}


def sequence_multiple(tp_size: int, sequence_parallel: bool) -> int:
    """What every micro-batch length S must be a multiple of: 8, and with SP also TP (the sequence is split over TP)."""
    if not sequence_parallel:
        return BASE_SEQ_MULTIPLE
    return BASE_SEQ_MULTIPLE * tp_size // math.gcd(BASE_SEQ_MULTIPLE, tp_size)
