"""Vocab-parallel token log-prob and entropy over logits [..., V/tp] (fp32 or bf16), with backward.

The compiled kernels (csrc/logprob.cpp) read each logit once in the forward and write the gradient in one pass,
optionally in place over the logits; the logits are never copied or upcast as a whole. Across tensor parallelism
this module does the two collectives on an explicitly passed TP group: one all-reduce MAX of the shard maxima and
one all-reduce SUM of the stacked [sumexp, sum_pd, target_logit] (docs/train-step.md).

Every entry point takes a sampling `temperature`: the log-probs are those of softmax(logits / temperature), the
distribution the rollout engine samples from (TRL's GRPOTrainer does the same). The scaled logits are written once
(in place when the caller lets the logits be overwritten, else into the buffer that then takes the gradient), and
the chain-rule factor 1/temperature is folded into the coefficients the backward kernel already multiplies by.

Public entry points:
    vocab_parallel_logprob(logits, target, tp_group=None, ...)      -> (logp, entropy), differentiable
    fused_logprob_loss(logits, target, dloss_dlogp, tp_group=None)  -> (loss, logp, entropy), gradient in forward
    logprob_reference(logits, target, temperature=1.0)              -> (logp, entropy), pure torch, full vocab
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from aapo_megatron.ops._extension import load_extension

_MIN_SHIFT = -104.0  # csrc/aapo_math.h kMinShift: exp() of anything lower is 0 in fp32

# ---------------------------------------------------------------------------------------------------- step functions
# Shared by the compiled path and the pure-torch reference (`shard_stats_reference` produces the same [N, 4]).


def tp_size_and_rank(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(size, rank) of the TP group; (1, 0) when there is none."""
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def shard_stats_reference(logits2d: torch.Tensor, target: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Pure-torch per-row shard stats [N, 4] = (max, sumexp, sum_pd, target logit or 0), fp32; see aapo_math.h."""
    x = logits2d.float()  # [N, V/tp]
    m = x.amax(dim=1)  # [N]
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    d = (x - m_safe[:, None]).clamp(min=_MIN_SHIFT)  # [N, V/tp]
    e = d.exp()
    local = target - vocab_start
    in_shard = (local >= 0) & (local < x.size(1))
    tl = x.gather(1, local.clamp(0, x.size(1) - 1)[:, None])[:, 0]
    return torch.stack([m, e.sum(1), (e * d).sum(1), torch.where(in_shard, tl, torch.zeros_like(tl))], dim=1)


def combine_shard_stats(stats: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Per-shard stats [N, 4] -> full-vocabulary stats [N, 4]: all-reduce MAX, rebase, one all-reduce SUM."""
    if tp_size_and_rank(tp_group)[0] == 1:
        return stats
    local_max = stats[:, 0].contiguous()  # [N]
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    delta = local_max - global_max  # [N], <= 0; -inf where the shard row is all -inf
    scale = torch.exp(delta)
    sumexp, sum_pd, target_logit = stats[:, 1], stats[:, 2], stats[:, 3]
    packed = torch.stack([scale * sumexp, scale * (sum_pd + delta.clamp(min=_MIN_SHIFT) * sumexp), target_logit])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)  # [3, N]
    return torch.stack([global_max, packed[0], packed[1], packed[2]], dim=1)


def check_temperature(temperature: float) -> float:
    """The sampling temperature as a float; ValueError unless it is finite and > 0."""
    t = float(temperature)
    if not (t > 0 and t != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0 (the logits are divided by it), got {temperature!r}")
    return t


def scale_logits(logits2d: torch.Tensor, temperature: float, inplace: bool) -> tuple[torch.Tensor, bool]:
    """(logits2d / temperature, whether the result may be overwritten): the input itself when temperature is 1;
    divided in place when `inplace`; else a new buffer (which the backward may then overwrite)."""
    if temperature == 1.0:
        return logits2d, inplace
    if inplace:
        return logits2d.div_(temperature), True
    return torch.div(logits2d, temperature), True


def finalize_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary stats [N, 4] -> (logp, entropy, row max, log sumexp), each [N]; nats.

    log p = (x_target - max) - log sumexp: subtracting the max first stays exact for large common logit offsets.
    """
    row_max, sumexp, sum_pd, target_logit = stats.unbind(dim=1)
    log_sumexp = torch.log(sumexp)
    return (target_logit - row_max) - log_sumexp, log_sumexp - sum_pd / sumexp, row_max.contiguous(), log_sumexp


def _prepare(
    logits: torch.Tensor, target: torch.Tensor, tp_group: Optional[dist.ProcessGroup], vocab_start: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate and flatten: (logits [N, V/tp] view, target [N] int64, vocab_start, vocab_size)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(f"logits must be a tensor [..., V/tp] with at least 2 dims, got {getattr(logits, 'shape', logits)}")
    if logits.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"logits must be float32 or bfloat16, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an integer tensor (int64 or int32), got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits shape without the vocab dim {tuple(logits.shape[:-1])}"
        )
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the vocab dimension (stride(-1) == 1)")
    shard = logits.size(-1)
    try:
        logits2d = logits.view(-1, shard)
    except RuntimeError as exc:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} and strides {logits.stride()} cannot be viewed as [N, V/tp] "
            "without a copy; pass them in their memory layout (e.g. [s, b, V/tp]) with target laid out the same"
        ) from exc
    tp, rank = tp_size_and_rank(tp_group)
    if vocab_start is None:
        vocab_start = rank * shard
    return logits2d, target.reshape(-1).long(), int(vocab_start), shard * tp


# ---------------------------------------------------------------------------------------------------- autograd


class _VocabParallelLogprob(torch.autograd.Function):
    """logits [N, V/tp] -> (logp [N], entropy [N]); backward via the compiled kernel, optionally in place."""

    @staticmethod
    def forward(ctx, logits2d, target, vocab_start, vocab_size, tp_group, inplace_backward, temperature=1.0):
        scaled, own = scale_logits(logits2d, temperature, inplace_backward)  # [N, V/tp]
        stats = torch.ops.aapo.logprob_shard_stats(scaled, target, vocab_start, vocab_size)  # [N, 4]
        logp, entropy, row_max, log_sumexp = finalize_stats(combine_shard_stats(stats, tp_group))
        ctx.save_for_backward(scaled, target, row_max, log_sumexp, entropy)
        ctx.vocab_start, ctx.vocab_size, ctx.inplace, ctx.temperature = vocab_start, vocab_size, own, temperature
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits2d, target, row_max, log_sumexp, entropy = ctx.saved_tensors  # logits2d: scaled by 1/temperature
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(row_max)
        inv_t = 1.0 / ctx.temperature  # d(x/T)/dx, folded into the per-row coefficients
        grad_ent = None if grad_entropy is None else (grad_entropy.float() * inv_t).contiguous()
        grad = logits2d if ctx.inplace else torch.empty_like(logits2d)
        torch.ops.aapo.logprob_shard_backward(
            logits2d, target, ctx.vocab_start, ctx.vocab_size, row_max, log_sumexp, entropy,
            (grad_logp.float() * inv_t).contiguous(), grad_ent, grad,
        )
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits2d)  # any later use of the old logits now fails loudly
        return grad, None, None, None, None, None, None


def vocab_parallel_logprob(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    inplace_backward: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-prob and entropy (nats, fp32, shape of target) of softmax(logits / temperature), from
    vocab-sharded logits [..., V/tp].

    The shard of this rank is [vocab_start, vocab_start + V/tp) (default: TP rank * V/tp, Megatron's layout).
    With inplace_backward the gradient overwrites the logits buffer (use when nothing else needs the logits; with
    temperature != 1 the logits are then divided in place in the forward).
    """
    load_extension()
    temperature = check_temperature(temperature)
    shape = target.shape
    logits2d, target1d, start, vocab_size = _prepare(logits, target, tp_group, vocab_start)
    logp, entropy = _VocabParallelLogprob.apply(logits2d, target1d, start, vocab_size, tp_group, inplace_backward,
                                                temperature)
    return logp.view(shape), entropy.view(shape)


DLossDLogp = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class _FusedLogprobLoss(torch.autograd.Function):
    """Forward computes the loss and its gradient w.r.t. the logits; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits2d, target, vocab_start, vocab_size, tp_group, coef_or_fn, shape, inplace, temperature):
        tp = tp_size_and_rank(tp_group)[0]
        want_grad = logits2d.requires_grad
        grad = None
        inv_t = 1.0 / temperature  # d(x/T)/dx, folded into the coefficients the kernels multiply by
        logits2d, inplace = scale_logits(logits2d, temperature, inplace)  # [N, V/tp], divided by T
        if isinstance(coef_or_fn, torch.Tensor) and tp == 1 and want_grad:
            coef = coef_or_fn.reshape(-1).float().contiguous()
            grad = logits2d if inplace else torch.empty_like(logits2d)
            kernel_coef = coef if inv_t == 1.0 else (coef * inv_t).contiguous()
            stats = torch.ops.aapo.logprob_fused_fwd_bwd(logits2d, target, kernel_coef, grad)  # one read + one write
            logp, entropy, _, _ = finalize_stats(stats)
            loss = (coef.double() * logp.double()).sum().float()
        else:
            stats = torch.ops.aapo.logprob_shard_stats(logits2d, target, vocab_start, vocab_size)
            logp, entropy, row_max, log_sumexp = finalize_stats(combine_shard_stats(stats, tp_group))
            if isinstance(coef_or_fn, torch.Tensor):
                coef = coef_or_fn.reshape(-1).float().contiguous()
                loss = (coef.double() * logp.double()).sum().float()
            else:
                with torch.enable_grad():
                    lp = logp.detach().view(shape).requires_grad_(True)
                    loss = coef_or_fn(lp)
                    if loss.dim() != 0:
                        raise ValueError(f"dloss_dlogp callable must return a scalar loss, got shape {tuple(loss.shape)}")
                    (coef,) = torch.autograd.grad(loss, lp, allow_unused=True)
                loss = loss.detach()
                coef = torch.zeros_like(logp) if coef is None else coef.reshape(-1).float().contiguous()
            if want_grad:
                grad = logits2d if inplace else torch.empty_like(logits2d)
                kernel_coef = coef if inv_t == 1.0 else (coef * inv_t).contiguous()
                torch.ops.aapo.logprob_shard_backward(
                    logits2d, target, vocab_start, vocab_size, row_max, log_sumexp, entropy, kernel_coef, None, grad
                )
        if grad is not None and inplace:
            torch.autograd.graph.increment_version(logits2d)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0 or grad_loss is None:
            return (None,) * 9
        if not (grad_loss.numel() == 1 and float(grad_loss) == 1.0):
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def fused_logprob_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dloss_dlogp: DLossDLogp,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    inplace: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scalar loss plus (logp, entropy) [shape of target] of softmax(logits / temperature), with d loss/d logits
    computed inside the forward.

    dloss_dlogp is either a tensor c (shape of target): loss = sum(c * logp), at TP=1 one fused pass per row; or a
    callable logp -> scalar loss (e.g. a clipped-ratio loss), differentiated by autograd on the [N] log-probs.
    logp and entropy are returned without gradient. With inplace the gradient replaces the logits in the forward,
    so their memory holds the gradient from then on (the logits must not be used afterwards).
    """
    load_extension()
    temperature = check_temperature(temperature)
    shape = target.shape
    if isinstance(dloss_dlogp, torch.Tensor) and tuple(dloss_dlogp.shape) != tuple(shape):
        raise ValueError(f"dloss_dlogp shape {tuple(dloss_dlogp.shape)} must equal target shape {tuple(shape)}")
    if not isinstance(dloss_dlogp, torch.Tensor) and not callable(dloss_dlogp):
        raise TypeError(f"dloss_dlogp must be a tensor or a callable, got {type(dloss_dlogp).__name__}")
    logits2d, target1d, start, vocab_size = _prepare(logits, target, tp_group, vocab_start)
    loss, logp, entropy = _FusedLogprobLoss.apply(
        logits2d, target1d, start, vocab_size, tp_group, dloss_dlogp, shape, inplace, temperature
    )
    return loss, logp.view(shape), entropy.view(shape)


# ---------------------------------------------------------------------------------------------------- reference


def logprob_reference(logits: torch.Tensor, target: torch.Tensor,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch token log-prob and entropy (fp32, autograd) of softmax(logits / temperature), logits [..., V]."""
    logsm = torch.log_softmax(logits.float() / check_temperature(temperature), dim=-1)  # [..., V]
    logp = logsm.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    entropy = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    return logp, entropy
