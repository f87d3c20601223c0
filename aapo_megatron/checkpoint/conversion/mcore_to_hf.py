"""Megatron dist_checkpointing -> HF safetensors shards + index + config.json, streamed, with bounded memory.

The mirror of `hf_to_mcore`: W worker processes each take one pipeline stage's
tensors (layers [r*L/W, (r+1)*L/W), embedding first, final norm and output layer
last). A worker reads one Megatron tensor at a time straight from the torch_dist
files (`checkpoint.mcore.CheckpointTensorReader`: the region of one layer, whatever TP/PP
the checkpoint was saved at), converts it to HF names through `models.mapping`
and streams the result into its own size-capped shards (`SafetensorsStreamWriter`:
headers planned up front, nothing buffered); the parent then gives the shards
their HF names (`model-0000i-of-0000N.safetensors`, in layer order) and writes the
index. Workers import neither Megatron nor a process group. Per-worker memory: the
process itself plus about one Megatron tensor and its HF pieces.

    convert_mcore_to_hf("/ckpt/qwen-mcore", "/ckpt/qwen-hf")
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from aapo_megatron.checkpoint.errors import ConversionError
from aapo_megatron.checkpoint.hf import CONFIG_NAME, copy_files, parse_size
from aapo_megatron.checkpoint.hf_writer import finalize_shards, write_config
from aapo_megatron.checkpoint.mcore import (
    HF_SUBDIR,
    METADATA_NAME,
    is_mcore_checkpoint,
    read_checkpoint_metadata,
    validate_mcore_checkpoint,
)
from aapo_megatron.checkpoint.conversion.hf_to_mcore import DTYPES, ConversionResult, choose_workers
from aapo_megatron.checkpoint.conversion.launch import run_workers
from aapo_megatron.checkpoint.conversion.outdir import atomic_output_dir
from aapo_megatron.models.arch import ArchSpec

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _hf_order(mapping, pp_rank: int, pp_size: int) -> list:
    """Stage groups in HF file order: embedding, layers ascending, final norm, lm_head."""
    groups = mapping.stage_groups(pp_rank, pp_size)
    first = [g for g in groups if g.layer is None and g.hf_names == ("model.embed_tokens.weight",)]
    layers = [g for g in groups if g.layer is not None]
    last = [g for g in groups if g.layer is None and g not in first]
    return first + layers + last


def _mcore_to_hf_worker(rank: int, world: int, ckpt_dir: str, out_dir: str, hf_config: dict, out_dtype: str,
                        max_shard_bytes: int, progress: bool) -> dict:
    """Worker `rank` of `world`: stage `rank`'s tensors, read one group at a time and streamed into HF shards.

    Needs neither Megatron nor a process group: the global tensors are read region by region from the
    torch_dist files (any TP/PP the checkpoint was saved at).
    Returns {"parts": [ShardPart], "peak_live_bytes": int, "base_rss": int}.
    """
    import torch
    from tqdm import tqdm

    from aapo_megatron.checkpoint.hf_writer import SafetensorsStreamWriter
    from aapo_megatron.checkpoint.mcore import CheckpointTensorReader
    from aapo_megatron.checkpoint.conversion.memory import LiveTensorBytes, current_rss
    from aapo_megatron.models.mapping import WeightMapping

    spec = ArchSpec.from_hf_config(hf_config)
    mapping = WeightMapping(spec, naming="te")  # the checkpoint's keys use Transformer Engine norm names
    reader = CheckpointTensorReader(ckpt_dir)
    groups = _hf_order(mapping, rank, world)
    target = getattr(torch, out_dtype)
    layout = [(n, target, mapping.hf_shape(n)) for g in groups for n in g.hf_names]
    writer = SafetensorsStreamWriter(out_dir, max_shard_bytes, layout, tag=f"{rank:05d}")
    tracker = LiveTensorBytes()
    base_rss = current_rss()
    for group in tqdm(groups, desc=f"mcore-to-hf stage {rank}/{world}", unit="group",
                      disable=not progress or rank != 0, leave=False):
        full = tracker.track(_read_full(reader, mapping, group))
        for name, tensor in mapping.to_hf(group, full).items():
            writer.add(name, tracker.track(tensor.to(target).contiguous()))
            del tensor
        del full
    return {"parts": writer.close(), "peak_live_bytes": tracker.peak, "base_rss": base_rss}


def _read_full(reader, mapping, group):
    """The full Megatron tensor of `group` (vocab rows unpadded) from the checkpoint: one layer of a stacked key."""
    shape = mapping.megatron_shape(group.megatron_name)
    if group.layer is None:
        return reader.read(group.megatron_name, (0,) * len(shape), shape)  # vocab: the first vocab_size rows
    key = group.megatron_name.replace(f"decoder.layers.{group.layer}.", "decoder.layers.", 1)
    return reader.read(key, (group.layer,) + (0,) * len(shape), (1, *shape))[0]


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
            (os.path.abspath(ckpt_dir), tmp, config, out_dtype, max_shard_bytes, progress),
        )
        parts = [p for r in results for p in r["parts"]]
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
        peak_live_bytes=max(r["peak_live_bytes"] for r in results),
        worker_base_rss=max(r["base_rss"] for r in results),
    )


def _param_count(spec: ArchSpec) -> int:
    """Number of parameters of the HF model described by `spec`."""
    from aapo_megatron.models.mapping import WeightMapping

    mapping = WeightMapping(spec)
    total = 0
    for name in mapping.hf_names():
        n = 1
        for d in mapping.hf_shape(name):
            n *= d
        total += n
    return total


__all__ = ["convert_mcore_to_hf", "DEFAULT_MAX_SHARD_SIZE", "METADATA_NAME"]
