"""Move weights between HF tensors and a live Megatron model (one rank's TP shard / PP stage).

    mapping = WeightMapping(spec, naming=model_naming(model))
    load_hf_weights(model, mapping, hf_state_dict_or_getter)            # fill this rank's shard
    hf = gather_hf_state_dict(model, mapping)                           # every rank: the full HF state dict
    for name, tensor in iter_hf_tensors(model, mapping): ...            # same, streamed one tensor at a time

TP and PP coordinates default to Megatron's parallel_state; process groups can be
passed explicitly. The names and layouts come from `aapo_megatron.models.mapping`.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist

from aapo_megatron.models.mapping import (
    EMBEDDING,
    OUTPUT_LAYER,
    HFSource,
    MappingError,
    WeightGroup,
    WeightMapping,
    detect_naming,
)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron wrappers (DistributedDataParallel, Float16Module: `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_naming(model: torch.nn.Module) -> str:
    """'te' or 'local': which layer-norm naming the model's parameters use."""
    return detect_naming(name for name, _ in unwrap_model(model).named_parameters())


def _coords(tp_rank, tp_size, pp_rank, pp_size) -> tuple[int, int, int, int]:
    if None in (tp_rank, tp_size, pp_rank, pp_size):
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        tp_size = ps.get_tensor_model_parallel_world_size() if tp_size is None else tp_size
        pp_rank = ps.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
        pp_size = ps.get_pipeline_model_parallel_world_size() if pp_size is None else pp_size
    return tp_rank, tp_size, pp_rank, pp_size


def _tied_output_param(model: torch.nn.Module, mapping: WeightMapping, pp_rank: int, pp_size: int):
    """The last stage's copy of a tied embedding (exists only when PP > 1), else None."""
    if not mapping.spec.tie_word_embeddings or pp_size == 1 or pp_rank != pp_size - 1:
        return None
    return dict(model.named_parameters()).get(OUTPUT_LAYER)


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module,
    mapping: WeightMapping,
    hf: HFSource,
    tp_rank: Optional[int] = None,
    tp_size: Optional[int] = None,
    pp_rank: Optional[int] = None,
    pp_size: Optional[int] = None,
) -> list[str]:
    """Copy HF tensors (dict or name -> tensor getter) into this rank's model; return the local names filled.

    Only the HF tensors of this rank's stage are requested. Every parameter of the model must be
    covered, else MappingError lists the missing ones; shapes are checked (name and both shapes).
    """
    tp_rank, tp_size, pp_rank, pp_size = _coords(tp_rank, tp_size, pp_rank, pp_size)
    model = unwrap_model(model)
    params = dict(model.named_parameters())
    filled: list[str] = []
    tied_output = _tied_output_param(model, mapping, pp_rank, pp_size)
    for group in mapping.stage_groups(pp_rank, pp_size):
        local = mapping.local_name(group.megatron_name, pp_rank, pp_size)
        full = mapping.to_megatron(group, hf)
        shard = mapping.shard(group.megatron_name, full, tp_rank, tp_size)
        if local not in params:
            raise MappingError(f"the model has no parameter {local!r} (global {group.megatron_name!r}); "
                               f"is the naming {mapping.naming!r} right?")
        _copy(params[local], shard, local)
        filled.append(local)
    if tied_output is not None:
        # Tied embedding, PP > 1: the last stage holds a copy of the embedding as output_layer.weight.
        group = mapping.group(EMBEDDING)
        _copy(tied_output, mapping.shard(EMBEDDING, mapping.to_megatron(group, hf), tp_rank, tp_size), OUTPUT_LAYER)
        filled.append(OUTPUT_LAYER)
    missing = sorted(set(params) - set(filled))
    if missing:
        raise MappingError(f"these model parameters have no HF source: {missing}")
    return filled


def _copy(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise MappingError(f"tensor {name!r}: the model expects shape {tuple(param.shape)}, "
                           f"the checkpoint gives {tuple(value.shape)}")
    param.data.copy_(value.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def local_megatron_shards(
    model: torch.nn.Module,
    mapping: WeightMapping,
    pp_rank: Optional[int] = None,
    pp_size: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """This rank's parameter shards keyed by GLOBAL Megatron name (the tied output copy is left out)."""
    _, _, pp_rank, pp_size = _coords(0, 1, pp_rank, pp_size)
    params = dict(unwrap_model(model).named_parameters())
    out = {}
    for group in mapping.stage_groups(pp_rank, pp_size):
        local = mapping.local_name(group.megatron_name, pp_rank, pp_size)
        if local not in params:
            raise MappingError(f"the model has no parameter {local!r} (global {group.megatron_name!r})")
        out[group.megatron_name] = params[local].detach()
    return out


def gather_tp(mapping: WeightMapping, megatron_name: str, shard: torch.Tensor,
              tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Full Megatron tensor from this rank's TP shard (all_gather over `tp_group`; every TP rank gets it)."""
    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group)
    if tp_size == 1:
        return mapping.unshard(megatron_name, [shard])
    if mapping.group(megatron_name).tp_layout == "replicated":
        return shard
    shard = shard.contiguous()
    shards = [torch.empty_like(shard) for _ in range(tp_size)]
    dist.all_gather(shards, shard, group=tp_group)
    return mapping.unshard(megatron_name, shards)


def _hf_dtype(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(unwrap_model(model).parameters())
    return p.dtype, p.device


@torch.no_grad()
def iter_stage_hf_tensors(
    model: torch.nn.Module,
    mapping: WeightMapping,
    tp_group: Optional[dist.ProcessGroup] = None,
    pp_rank: Optional[int] = None,
    pp_size: Optional[int] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight of this rank's PP stage, TP-gathered (collective over tp_group)."""
    _, _, pp_rank, pp_size = _coords(0, 1, pp_rank, pp_size)
    shards = local_megatron_shards(model, mapping, pp_rank, pp_size)
    for group in mapping.stage_groups(pp_rank, pp_size):
        full = gather_tp(mapping, group.megatron_name, shards[group.megatron_name], tp_group)
        yield from mapping.to_hf(group, full).items()


@torch.no_grad()
def iter_hf_tensors(
    model: torch.nn.Module,
    mapping: WeightMapping,
    tp_group: Optional[dist.ProcessGroup] = None,
    pp_group: Optional[dist.ProcessGroup] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for the whole model on every rank, one tensor at a time (TP all_gather, PP broadcast).

    Collective: all ranks of the TP and PP groups must iterate it to the end, in the same order.
    Stages are visited in order; receivers know names and shapes from the mapping, so only tensors move.
    """
    from megatron.core import parallel_state as ps

    if pp_group is None:
        pp_group = ps.get_pipeline_model_parallel_group()
    pp_size = dist.get_world_size(pp_group)
    pp_rank = dist.get_rank(pp_group)
    dtype, device = _hf_dtype(model)
    for stage in range(pp_size):
        if stage == pp_rank:
            local = iter_stage_hf_tensors(model, mapping, tp_group, pp_rank, pp_size)
        for group in mapping.stage_groups(stage, pp_size):
            for hf_name in group.hf_names:
                if stage == pp_rank:
                    name, tensor = next(local)
                    assert name == hf_name, (name, hf_name)
                    tensor = tensor.contiguous()
                else:
                    tensor = torch.empty(mapping.hf_shape(hf_name), dtype=dtype, device=device)
                if pp_size > 1:
                    dist.broadcast(tensor, src=dist.get_global_rank(pp_group, stage), group=pp_group)
                yield hf_name, tensor


def gather_hf_state_dict(
    model: torch.nn.Module,
    mapping: WeightMapping,
    tp_group: Optional[dist.ProcessGroup] = None,
    pp_group: Optional[dist.ProcessGroup] = None,
) -> dict[str, torch.Tensor]:
    """The full HF state dict on every rank (see `iter_hf_tensors`); tied models have no lm_head.weight."""
    return {name: tensor.clone() for name, tensor in iter_hf_tensors(model, mapping, tp_group, pp_group)}


def stage_hf_names(mapping: WeightMapping, pp_rank: int, pp_size: int) -> list[str]:
    """HF names whose weights live on pipeline stage `pp_rank`."""
    return [n for g in mapping.stage_groups(pp_rank, pp_size) for n in g.hf_names]


__all__ = [
    "WeightGroup",
    "gather_hf_state_dict",
    "gather_tp",
    "iter_hf_tensors",
    "iter_stage_hf_tensors",
    "load_hf_weights",
    "local_megatron_shards",
    "model_naming",
    "stage_hf_names",
    "unwrap_model",
]
