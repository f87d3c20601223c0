"""Megatron DDP wrapping, optimizer, LR schedule, and a guarded optimizer update.

The loss is summed over tokens and Megatron divides by the step's token count
(`calculate_per_token_loss`): `finalize_model_grads` all-reduces the count over
data-parallel ranks and scales the gradients by its inverse, so the update is
the global token-mean of docs/algorithms.md for any micro-batching and DP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads  # attribute access: the CPU shims patch it at runtime
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from aapo_megatron.config import OptimConfig
from aapo_megatron.distributed import current_platform


def wrap_ddp(model_chunks: list[torch.nn.Module], use_distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """Wrap each model chunk in Megatron DDP configured for per-token loss scaling."""
    wrapped = []
    for chunk in model_chunks:
        tf_config = chunk.config
        tf_config.calculate_per_token_loss = True
        tf_config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        wrapped.append(DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=chunk))
    return wrapped


def build_optimizer(model_chunks: list[DistributedDataParallel], cfg: OptimConfig, bf16: bool,
                    use_distributed_optimizer: bool):
    """Megatron Adam(W) over DDP chunks. Clipping is done by `guarded_update`, so Megatron's own is off."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        clip_grad=0.0,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    if not current_platform().cuda:
        use_fused_cpu_adam(optimizer)
    return optimizer


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron (possibly chained) optimizer."""
    chain = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in chain if getattr(o, "optimizer", None) is not None]


def use_fused_cpu_adam(optimizer) -> None:
    """Switch torch Adam(W) (Megatron's fallback without TE/Apex) to its fused CPU kernel: one pass over
    param, grad and both moments instead of ~6 per-parameter passes; the same update up to rounding."""
    for opt in torch_optimizers(optimizer):
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            for group in opt.param_groups:
                group["foreach"], group["fused"] = False, True
            opt.defaults.update(foreach=False, fused=True)


def build_scheduler(optimizer, cfg: OptimConfig, total_updates: int) -> OptimizerParamScheduler:
    """Linear warmup, then constant or cosine to `min_lr` at `total_updates` (units: optimizer updates)."""
    decay_steps = max(total_updates, cfg.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps > 0 else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.lr_schedule == "cosine" else cfg.lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style="cosine" if cfg.lr_schedule == "cosine" else "constant",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


@dataclass
class UpdateResult:
    """Outcome of one optimizer update."""

    applied: bool
    """False when the update was skipped for a non-finite gradient."""
    grad_norm: float
    """Global gradient L2 norm before clipping (over all model-parallel ranks)."""
    lr: float
    """Learning rate used (or that would have been used)."""


def current_lr(optimizer) -> float:
    """Learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def guarded_update(optimizer, scheduler: Optional[OptimizerParamScheduler], clip_grad: float) -> UpdateResult:
    """Step only if the gradient is finite: norm, clip to `clip_grad` (0 = off), step, advance the LR schedule."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    lr = current_lr(optimizer)
    if found_inf or not math.isfinite(grad_norm):
        return UpdateResult(applied=False, grad_norm=grad_norm, lr=lr)
    if clip_grad > 0.0:
        params = optimizer.get_parameters()
        clip_grads.clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    if scheduler is not None:
        scheduler.step(increment=1)
    return UpdateResult(applied=True, grad_norm=grad_norm, lr=lr)
