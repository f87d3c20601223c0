"""Megatron dist_checkpointing (torch_dist) checkpoints of a GPTModel, plus the metadata that makes them self-contained.

A checkpoint directory written by `aapo-convert hf-to-mcore` holds

    metadata.json, .metadata, __*_*.distcp, common.pt    Megatron dist_checkpointing (torch_dist)
    aapo_checkpoint.json                                  format version, dtype, the HF config (-> ArchSpec)
    hf/                                                   config.json + tokenizer/generation files of the source

Tensors are stored with global shapes (Megatron's sharded_state_dict: layers stacked
along a leading axis by global layer index, TP splits as axis fragments), so the same
directory loads at any TP/PP:

    model = build_gpt_model(read_arch(ckpt), dtype=...)    # any parallel layout
    load_mcore_checkpoint(model, ckpt)                      # collective over all ranks
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from aapo_megatron.convert.errors import ConversionError, MissingTensorError, ShapeMismatchError
from aapo_megatron.models.arch import ArchSpec

METADATA_NAME = "aapo_checkpoint.json"
HF_SUBDIR = "hf"
FORMAT = "aapo-megatron/mcore"
FORMAT_VERSION = 1


def is_mcore_checkpoint(path: str) -> bool:
    """True if `path` is a Megatron dist_checkpointing directory (has metadata.json)."""
    return os.path.isfile(os.path.join(path, "metadata.json"))


def write_checkpoint_metadata(ckpt_dir: str, hf_config: dict[str, Any], dtype: str,
                              hf_files_dir: Optional[str] = None, hf_files: tuple[str, ...] = (),
                              extra: Optional[dict[str, Any]] = None) -> None:
    """Write aapo_checkpoint.json and hf/config.json, then copy `hf_files` (may include config.json) from hf_files_dir."""
    from aapo_megatron.convert.hf_io import copy_files, write_config

    spec = ArchSpec.from_hf_config(hf_config)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "architecture": spec.hf_architecture,
        "num_layers": spec.num_layers,
        "vocab_size": spec.vocab_size,
        "hf_config": hf_config,
        **(extra or {}),
    }
    with open(os.path.join(ckpt_dir, METADATA_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    hf_dir = os.path.join(ckpt_dir, HF_SUBDIR)
    os.makedirs(hf_dir, exist_ok=True)
    write_config(hf_dir, hf_config)
    if hf_files:
        copy_files(hf_files_dir, hf_dir, hf_files)


def read_checkpoint_metadata(ckpt_dir: str) -> dict[str, Any]:
    """Content of aapo_checkpoint.json; ConversionError naming the directory if it is not such a checkpoint."""
    if not os.path.isdir(ckpt_dir):
        raise ConversionError(f"Megatron checkpoint directory {ckpt_dir} does not exist")
    if not is_mcore_checkpoint(ckpt_dir):
        raise ConversionError(f"{ckpt_dir} is not a Megatron dist_checkpointing checkpoint (no metadata.json)")
    path = os.path.join(ckpt_dir, METADATA_NAME)
    if not os.path.isfile(path):
        raise ConversionError(
            f"{ckpt_dir} has no {METADATA_NAME} (not written by aapo-convert); pass --hf-config with the model's "
            "config.json"
        )
    with open(path) as f:
        try:
            meta = json.load(f)
        except ValueError as exc:
            raise ConversionError(f"{path} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ConversionError(f"{path}: unknown format {meta.get('format')!r} version {meta.get('format_version')!r}")
    return meta


def read_arch(ckpt_dir: str) -> ArchSpec:
    """ArchSpec of a checkpoint written by aapo-convert (from its stored HF config)."""
    return ArchSpec.from_hf_config(read_checkpoint_metadata(ckpt_dir)["hf_config"])


def checkpoint_tensors(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (global shape, dtype)} of every tensor in a torch_dist checkpoint, from its .metadata (no data read)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(ckpt_dir).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable checkpoint
        raise ConversionError(f"cannot read the torch_dist metadata of {ckpt_dir}: {exc}") from exc
    out = {}
    for key, md in meta.state_dict_metadata.items():
        if hasattr(md, "size") and hasattr(md, "properties"):
            out[key] = (tuple(md.size), md.properties.dtype)
    return out


def expected_checkpoint_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: global shape} Megatron's GPTModel.sharded_state_dict stores for `spec` (TP-independent part).

    Layer tensors are stacked along a leading axis of size num_layers under `decoder.layers.<name>`; norms use
    Transformer Engine names in either layer spec; vocab rows are unpadded (a checkpoint saved at a TP that pads
    the vocabulary has more rows).
    """
    from aapo_megatron.convert.mapping import WeightMapping

    mapping = WeightMapping(spec, naming="te")
    out = {}
    for g in mapping.global_groups():
        out[g.megatron_name] = mapping.megatron_shape(g.megatron_name)
    for g in mapping.layer_groups(0):
        key = g.megatron_name.replace("decoder.layers.0.", "decoder.layers.", 1)
        out[key] = (spec.num_layers,) + mapping.megatron_shape(g.megatron_name)
    return out


def validate_mcore_checkpoint(ckpt_dir: str, spec: ArchSpec) -> torch.dtype:
    """Check that every tensor `spec` needs is in the checkpoint with the right global shape; return their dtype."""
    stored = checkpoint_tensors(ckpt_dir)
    dtypes = set()
    for key, shape in expected_checkpoint_shapes(spec).items():
        if key not in stored:
            raise MissingTensorError(
                f"tensor '{key}' is missing from the Megatron checkpoint {ckpt_dir} "
                f"({spec.hf_architecture} with tie_word_embeddings={spec.tie_word_embeddings} needs it)"
            )
        got, dtype = stored[key]
        if got != shape:
            raise ShapeMismatchError(
                f"tensor '{key}' has shape {list(got)} in the Megatron checkpoint {ckpt_dir} "
                f"but the architecture needs {list(shape)}"
            )
        dtypes.add(dtype)
    if len(dtypes) != 1:
        raise ConversionError(f"{ckpt_dir} mixes parameter dtypes {sorted(str(d) for d in dtypes)}")
    return dtypes.pop()


def save_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Save this rank's part of `model` with dist_checkpointing (torch_dist); collective over all ranks."""
    from megatron.core import dist_checkpointing

    from aapo_megatron.models.weights import unwrap_model

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), ckpt_dir)


@torch.no_grad()
def load_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Fill this rank's `model` (any TP/PP) from a dist_checkpointing directory; collective over all ranks."""
    from megatron.core import dist_checkpointing

    from aapo_megatron.models.weights import unwrap_model

    if not is_mcore_checkpoint(ckpt_dir):
        raise ConversionError(f"{ckpt_dir} is not a Megatron dist_checkpointing checkpoint (no metadata.json)")
    model = unwrap_model(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state, strict=True)
