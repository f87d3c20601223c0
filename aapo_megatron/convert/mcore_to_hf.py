"""Megatron dist_checkpointing -> HF safetensors shards + index + config.json, streamed, with bounded memory.

The mirror of `hf_to_mcore`: W gloo workers laid out as TP=1, PP=W each load one
pipeline stage with `dist_checkpointing.load` (resharding from whatever TP/PP the
checkpoint was saved at), convert it to HF names through `convert.mapping` and
write their own size-capped shards; the parent then gives the shards their HF
names (`model-0000i-of-0000N.safetensors`, in layer order) and writes the index.
Per-worker memory: its stage plus one output shard being buffered.

    convert_mcore_to_hf("/ckpt/qwen-mcore", "/ckpt/qwen-hf")
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from aapo_megatron.convert.errors import ConversionError
from aapo_megatron.convert.hf_io import (
    CONFIG_NAME,
    copy_files,
    finalize_shards,
    parse_size,
    write_config,
)
from aapo_megatron.convert.hf_to_mcore import DTYPES, ConversionResult, choose_workers
from aapo_megatron.convert.launch import run_workers
from aapo_megatron.convert.mcore_io import (
    HF_SUBDIR,
    METADATA_NAME,
    is_mcore_checkpoint,
    read_checkpoint_metadata,
    validate_mcore_checkpoint,
)
from aapo_megatron.convert.outdir import atomic_output_dir
from aapo_megatron.models.arch import ArchSpec

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _hf_order(mapping, pp_rank: int, pp_size: int) -> list:
    """Stage groups in HF file order: embedding, layers ascending, final norm, lm_head."""
    groups = mapping.stage_groups(pp_rank, pp_size)
    first = [g for g in groups if g.layer is None and g.hf_names == ("model.embed_tokens.weight",)]
    layers = [g for g in groups if g.layer is not None]
    last = [g for g in groups if g.layer is None and g not in first]
    return first + layers + last


def _mcore_to_hf_worker(rank: int, world: int, ckpt_dir: str, out_dir: str, hf_config: dict, ckpt_dtype: str,
                        out_dtype: str, max_shard_bytes: int, progress: bool) -> list:
    """Worker `rank` of `world`: load pipeline stage `rank` from the checkpoint, write it as HF shards."""
    import torch
    from tqdm import tqdm

    from aapo_megatron.config import ParallelConfig
    from aapo_megatron.convert.hf_io import SafetensorsShardWriter
    from aapo_megatron.convert.mapping import WeightMapping
    from aapo_megatron.convert.mcore_io import load_mcore_checkpoint
    from aapo_megatron.models.gpt import build_gpt_model, resolve_dtype, transformer_config
    from aapo_megatron.models.parallel import init_distributed, seed_everything
    from aapo_megatron.models.weights import local_megatron_shards, model_naming

    init_distributed(ParallelConfig(tensor_model_parallel_size=1, pipeline_model_parallel_size=world,
                                    backend="gloo", timeout_minutes=120.0))
    seed_everything(0)
    spec = ArchSpec.from_hf_config(hf_config)
    config = transformer_config(spec, 1, world, ckpt_dtype, perform_initialization=False)
    model = build_gpt_model(spec, dtype=ckpt_dtype, config=config)
    load_mcore_checkpoint(model, ckpt_dir)
    mapping = WeightMapping(spec, naming=model_naming(model))
    shards = local_megatron_shards(model, mapping, rank, world)
    groups = _hf_order(mapping, rank, world)
    writer = SafetensorsShardWriter(out_dir, max_shard_bytes, tag=f"{rank:05d}")
    target = resolve_dtype(out_dtype)
    with torch.no_grad():
        for group in tqdm(groups, desc=f"mcore-to-hf stage {rank}/{world}", unit="group",
                          disable=not progress or rank != 0, leave=False):
            full = mapping.unshard(group.megatron_name, [shards[group.megatron_name]])  # TP=1: the full tensor
            for name, tensor in mapping.to_hf(group, full).items():
                writer.add(name, tensor.to(target))
    return writer.close()


def convert_mcore_to_hf(ckpt_dir: str, out_dir: str, hf_config: Optional[str] = None, dtype: Optional[str] = None,
                        workers: Optional[int] = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                        force: bool = False, progress: bool = True) -> ConversionResult:
    """Convert a Megatron dist_checkpointing directory to an HF directory (atomic: all or nothing at out_dir)."""
    t0 = time.perf_counter()
    if not os.path.isdir(ckpt_dir):
        raise ConversionError(f"Megatron checkpoint directory {ckpt_dir} does not exist")
    if not is_mcore_checkpoint(ckpt_dir):
        raise ConversionError(f"{ckpt_dir} is not a Megatron dist_checkpointing checkpoint (no metadata.json)")
    if hf_config is not None:
        if not os.path.isfile(hf_config):
            raise ConversionError(f"--hf-config {hf_config} does not exist")
        with open(hf_config) as f:
            try:
                config: dict[str, Any] = json.load(f)
            except ValueError as exc:
                raise ConversionError(f"{hf_config} is not valid JSON: {exc}") from exc
    else:
        config = dict(read_checkpoint_metadata(ckpt_dir)["hf_config"])
    # tokenizer / generation files stored by hf-to-mcore travel along in both cases
    carried_dir = os.path.join(ckpt_dir, HF_SUBDIR)
    carried = tuple(sorted(os.listdir(carried_dir))) if os.path.isdir(carried_dir) else ()
    carried = tuple(f for f in carried if f != CONFIG_NAME)
    spec = ArchSpec.from_hf_config(config)  # UnsupportedArchitectureError names it + lists the supported
    # every tensor present with the right global shape (MissingTensorError / ShapeMismatchError name it)
    ckpt_dtype = str(validate_mcore_checkpoint(ckpt_dir, spec)).replace("torch.", "")
    source_dtype = spec.torch_dtype if spec.torch_dtype in DTYPES else "float32"
    out_dtype = dtype or source_dtype
    if out_dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {out_dtype!r}; choose one of {', '.join(DTYPES)}")
    if out_dtype != source_dtype:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = out_dtype
    max_shard_bytes = parse_size(max_shard_size)
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}
    model_bytes = _param_count(spec) * bytes_per[ckpt_dtype if ckpt_dtype in bytes_per else "float32"]
    workers = choose_workers(spec.num_layers, model_bytes, workers)
    with atomic_output_dir(out_dir, force, inputs=(ckpt_dir,)) as tmp:
        results = run_workers(
            _mcore_to_hf_worker, workers,
            (os.path.abspath(ckpt_dir), tmp, config, ckpt_dtype, out_dtype, max_shard_bytes, progress),
        )
        parts = [p for rank_parts in results for p in rank_parts]
        finalize_shards(tmp, parts)
        if hf_config is None and os.path.isfile(os.path.join(carried_dir, CONFIG_NAME)) and out_dtype == source_dtype:
            copy_files(carried_dir, tmp, (CONFIG_NAME,))  # the source's config.json, byte for byte
        else:
            write_config(tmp, config)
        if carried:
            copy_files(carried_dir, tmp, carried)
    return ConversionResult(
        out_dir=os.path.abspath(out_dir),
        workers=workers,
        num_tensors=sum(len(p.names) for p in parts),
        bytes_written=sum(p.nbytes for p in parts),
        seconds=time.perf_counter() - t0,
    )


def _param_count(spec: ArchSpec) -> int:
    """Number of parameters of the HF model described by `spec`."""
    from aapo_megatron.convert.mapping import WeightMapping

    mapping = WeightMapping(spec)
    total = 0
    for name in mapping.hf_names():
        n = 1
        for d in mapping.hf_shape(name):
            n *= d
        total += n
    return total


__all__ = ["convert_mcore_to_hf", "DEFAULT_MAX_SHARD_SIZE", "METADATA_NAME"]
