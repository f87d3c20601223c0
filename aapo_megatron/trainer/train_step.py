"""One optimizer update over a slice of rollouts, through Megatron's forward-backward schedule.

Per micro-batch [b, S]: the model produces vocab-parallel logits [b, S, V/tp];
the fused log-prob op turns them into token log-probs [b, S] (TP collectives on
the tensor-parallel group); the configured policy loss returns the token SUM of
the loss and the token count. Megatron (calculate_per_token_loss) divides the
gradients by the step's total token count across micro-batches and DP ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from aapo_megatron.distributed import current_platform
from aapo_megatron.trainer.batch import (
    MicroBatch,
    RolloutBatch,
    make_micro_batches,
    choose_row_length,
    make_packed_micro_batches,
    micro_batch_shape,
)
from aapo_megatron.trainer.optim import UpdateResult, guarded_update

# loss_fn(logits [b, S, V/tp], micro_batch, tp_group) -> (token-SUMMED loss (scalar), {name: token-summed metric});
# metrics whose name ends in "_max" are maxima instead of sums.
MicroBatchLoss = Callable[[torch.Tensor, MicroBatch, Optional[dist.ProcessGroup]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepStats:
    """Token-mean statistics of one update (reduced over micro-batches and data-parallel ranks)."""

    loss: float
    """Token-mean loss."""
    num_tokens: int
    """Completion tokens in the update, all DP ranks."""
    update: UpdateResult
    """Whether the update was applied, grad norm, LR."""
    metrics: dict[str, float]
    """Token means of the loss function's extra metrics (e.g. entropy, clip fraction, KL)."""


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked (Megatron's convention); right padding needs nothing more."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)[None, None]


def micro_batcher(batch: RolloutBatch, token_budget: int, pack: bool = True,
                  pack_factor: int = 2, seq_multiple: int = 8) -> Callable[[range], list[MicroBatch]]:
    """indices -> micro-batches of at most `token_budget` tokens, one shape per call, rows spread evenly.

    pack=True packs samples into rows (`segment_ids`) of up to pack_factor x the longest sequence, the length
    computing the fewest tokens (`choose_row_length`), on the local layer spec; with Transformer Engine, whose
    attention ignores the mask (causal-only), rows hold one right-padded sample each. Row lengths are multiples
    of `seq_multiple` (with sequence parallelism also of TP: `models.activation_memory.sequence_multiple`).
    """
    from aapo_megatron.models.gpt import use_transformer_engine

    if pack and not use_transformer_engine():
        def packed(indices: range) -> list[MicroBatch]:
            row_len = choose_row_length(batch, indices, token_budget, pack_factor, seq_multiple)
            return make_packed_micro_batches(batch, indices, token_budget, row_len)

        return packed
    max_rows, seq_len = micro_batch_shape(batch, token_budget, seq_multiple)

    def padded(indices: range) -> list[MicroBatch]:
        rows = math.ceil(len(indices) / math.ceil(len(indices) / max_rows)) if len(indices) else max_rows
        return make_micro_batches(batch, indices, rows, seq_len)

    return padded


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, S, S] bool, True = masked, from segment ids [b, S]: causal within a segment, nothing across.

    Packed rows keep RoPE exact: Megatron rotates by the position in the row, and attention within a
    segment depends only on position differences.
    """
    seq_len = segment_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment_ids.device).tril()  # [S, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, S(q), S(k)]
    return ~(same & causal).unsqueeze(1)


def _device() -> torch.device:
    return current_platform().device


def run_update(
    model_chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
    micro_batches: list[MicroBatch],
    loss_fn: MicroBatchLoss,
    clip_grad: float,
) -> StepStats:
    """Forward/backward over `micro_batches` (this DP rank's share), then one guarded optimizer step."""
    if not micro_batches:
        raise ValueError("run_update: this data-parallel rank received no micro-batches")
    device = _device()
    rows, seq_len = micro_batches[0].tokens.shape
    tp_size = ps.get_tensor_model_parallel_world_size()
    if model_chunks[0].config.sequence_parallel and seq_len % tp_size:
        raise ValueError(f"run_update: with sequence parallelism the micro-batch length ({seq_len}) must be a "
                         f"multiple of the tensor-parallel size ({tp_size}); build the micro-batches with "
                         f"micro_batcher(..., seq_multiple=sequence_multiple(tp, True))")
    mask = causal_mask(seq_len, device)
    tp_group = ps.get_tensor_model_parallel_group()
    sums: dict[str, torch.Tensor] = {}

    def forward_step(data_iterator: Iterator[MicroBatch], model):
        mb = next(data_iterator)
        tokens = mb.tokens.to(device, non_blocking=True)
        positions = mb.position_ids.to(device, non_blocking=True)
        attn_mask = mask if mb.segment_ids is None else segment_causal_mask(mb.segment_ids.to(device))
        output = model(tokens, positions, attn_mask)  # last stage: logits [b, S, V/tp]; else hidden states

        def loss_func(logits: torch.Tensor):
            loss_sum, extra = loss_fn(logits, _to_device(mb, device), tp_group)
            num_tokens = mb.loss_mask.sum().to(device=device, dtype=torch.int)
            report = {**{k: v.detach().float() for k, v in extra.items()}, "loss": loss_sum.detach().float()}
            for k, v in report.items():
                if k.endswith("_max"):
                    sums[k] = torch.maximum(sums[k], v) if k in sums else v
                else:
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + v
            return loss_sum, num_tokens, report

        return output, loss_func

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model_chunks[0] if len(model_chunks) == 1 else model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=rows,
        forward_only=False,
    )
    update = guarded_update(optimizer, scheduler, clip_grad)
    return StepStats(update=update, **_reduce_stats(sums, micro_batches, device))


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return mb
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return MicroBatch(*(move(getattr(mb, f)) for f in MicroBatch.__dataclass_fields__))


def _reduce_stats(sums: dict[str, torch.Tensor], micro_batches: list[MicroBatch], device) -> dict:
    """Token means (and maxima for "*_max" keys) over the whole update: all DP ranks, visible on every PP stage."""
    keys = sorted(sums) if sums else []
    # Only the last pipeline stage computed losses; broadcast the key list so every rank agrees.
    obj = [keys]
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_last = ps.get_pipeline_model_parallel_last_rank()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(obj, src=pp_last, group=pp_group)
    keys = obj[0]
    sum_keys = [k for k in keys if not k.endswith("_max")]
    max_keys = [k for k in keys if k.endswith("_max")]
    local_tokens = float(sum(mb.loss_mask.sum().item() for mb in micro_batches))
    vsum = torch.tensor([local_tokens] + [float(sums[k]) if k in sums else 0.0 for k in sum_keys],
                        dtype=torch.float64, device=device)
    vmax = torch.tensor([float(sums[k]) if k in sums else -math.inf for k in max_keys] or [0.0],
                        dtype=torch.float64, device=device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(vsum, src=pp_last, group=pp_group)
        dist.broadcast(vmax, src=pp_last, group=pp_group)
    dist.all_reduce(vsum, group=ps.get_data_parallel_group())
    dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    total = vsum[0].item()
    means = {k: (vsum[i + 1].item() / total if total > 0 else math.nan) for i, k in enumerate(sum_keys)}
    means.update({k: vmax[i].item() for i, k in enumerate(max_keys)})
    loss = means.pop("loss", math.nan)
    return {"loss": loss, "num_tokens": int(total), "metrics": means}
