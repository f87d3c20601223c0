"""One micro-batch's policy loss straight from vocab-parallel logits (the piece the Megatron train step calls)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from aapo_megatron.algorithms.aggregation import GlobalTokenMean
from aapo_megatron.algorithms.losses import LossOutput, PolicyLoss, PolicyLossInputs
from aapo_megatron.ops.logprob import fused_logprob_loss, vocab_parallel_logprob


def policy_loss_from_logits(
    loss_fn: PolicyLoss,
    logits: torch.Tensor,
    target: torch.Tensor,
    inputs: PolicyLossInputs,
    norm: GlobalTokenMean,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    fused: bool = True,
    inplace: bool = False,
    temperature: float = 1.0,
) -> LossOutput:
    """Loss share of a micro-batch from logits [..., V/tp] and target [...]; metrics include token entropy.

    fused=True computes d loss/d logits inside the forward (one fused pass per row at TP=1 when the loss is linear
    in logp, e.g. aapo_ce); inplace=True lets that gradient overwrite the logits buffer. The log-probs are those
    of softmax(logits / temperature) (`algorithms.temperature`).
    """
    if fused:
        coef = loss_fn.logp_coefficients(inputs, norm)
        if coef is not None:
            loss, logp, entropy = fused_logprob_loss(logits, target, coef, tp_group=tp_group, inplace=inplace,
                                                       temperature=temperature)
        else:
            loss, logp, entropy = fused_logprob_loss(
                logits, target, lambda lp: loss_fn(lp, inputs, norm).loss, tp_group=tp_group, inplace=inplace,
                temperature=temperature,
            )
        out = loss_fn(logp, inputs, norm)  # metrics from the (gradient-free) log-probs
        out.loss = loss
    else:
        logp, entropy = vocab_parallel_logprob(logits, target, tp_group=tp_group, inplace_backward=inplace,
                                                 temperature=temperature)
        out = loss_fn(logp, inputs, norm)
    out.logp, out.entropy = logp.detach(), entropy.detach()
    out.metrics["entropy"] = GlobalTokenMean(norm.num_tokens_in_step)(entropy.detach(), inputs.mask)
    return out
