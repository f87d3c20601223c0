"""How a full Megatron tensor is split across TP ranks (layouts) and layers across PP stages.

Pure tensor code, no names and no torch.distributed; `models.mapping` applies it to whole models.
TP layouts: replicated (norms), column ([N/tp, ...]), gated_column (fc1: each rank holds [gate_r; up_r]),
row ([N, K/tp]) and vocab (padded to `ArchSpec.padded_vocab_size(tp)` rows, then split).
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from aapo_megatron.models.converters import MappingError, Shape

TPLayout = Literal["replicated", "column", "gated_column", "row", "vocab"]


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global layer indices [start, stop) of pipeline stage `pp_rank` when `num_layers` are split evenly."""
    if pp_size <= 0 or num_layers % pp_size:
        raise MappingError(f"pipeline size {pp_size} must divide the number of layers ({num_layers})")
    if not 0 <= pp_rank < pp_size:
        raise MappingError(f"pipeline rank {pp_rank} out of range [0, {pp_size})")
    per = num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


def shard_tensor(full: torch.Tensor, layout: TPLayout, tp_rank: int, tp_size: int,
                 padded_rows: Optional[int] = None) -> torch.Tensor:
    """TP slice of `full` for a layout: column [N/tp, ...], row [N, K/tp], gated_column [2F/tp, H], vocab [Vp/tp, H]."""
    if not 0 <= tp_rank < tp_size:
        raise MappingError(f"tensor-parallel rank {tp_rank} out of range [0, {tp_size})")
    if layout == "replicated":
        return full
    if layout == "vocab":
        rows = padded_rows if padded_rows is not None else full.shape[0]
        if rows % tp_size:
            raise MappingError(f"padded vocab size {rows} is not divisible by tp={tp_size}")
        per = rows // tp_size
        start, stop = tp_rank * per, (tp_rank + 1) * per
        if stop <= full.shape[0]:
            return full[start:stop]
        out = full.new_zeros((per,) + tuple(full.shape[1:]))  # [Vp/tp, H], padding rows are zero
        if start < full.shape[0]:
            out[: full.shape[0] - start] = full[start:]
        return out
    if layout == "column":
        _check_divisible(full.shape[0], tp_size, "rows")
        return full.chunk(tp_size, dim=0)[tp_rank]
    if layout == "row":
        _check_divisible(full.shape[1], tp_size, "columns")
        return full.chunk(tp_size, dim=1)[tp_rank]
    if layout == "gated_column":
        gate, up = full.chunk(2, dim=0)  # [F, H] each
        _check_divisible(gate.shape[0], tp_size, "rows of each fc1 half")
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise MappingError(f"unknown TP layout {layout!r}")


def unshard_tensor(shards: Sequence[torch.Tensor], layout: TPLayout, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Inverse of `shard_tensor`: concatenate TP shards (rank order); vocab rows cut back to `vocab_size`."""
    if layout == "replicated":
        return shards[0]
    if len(shards) == 1 and layout != "vocab":
        return shards[0]
    if layout == "vocab":
        full = torch.cat(list(shards), dim=0)
        return full[:vocab_size] if vocab_size is not None else full
    if layout == "column":
        return torch.cat(list(shards), dim=0)
    if layout == "row":
        return torch.cat(list(shards), dim=1)
    if layout == "gated_column":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise MappingError(f"unknown TP layout {layout!r}")


def shard_shape(full: Shape, layout: TPLayout, tp_size: int, padded_rows: int) -> Shape:
    """Shape of one TP rank's slice of a full tensor of shape `full` (vocab: `padded_rows` / tp rows)."""
    if tp_size == 1 or layout == "replicated":
        return full
    if layout == "vocab":
        return (padded_rows // tp_size,) + tuple(full[1:])
    if layout == "row":
        return (full[0], full[1] // tp_size)
    return (full[0] // tp_size,) + tuple(full[1:])


def _check_divisible(n: int, tp_size: int, what: str) -> None:
    if n % tp_size:
        raise MappingError(f"{n} {what} are not divisible by tp={tp_size}")
