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

import io
import json
import math
import os
from typing import Any, Optional

import torch

from aapo_megatron.checkpoint.errors import ConversionError, MissingTensorError, ShapeMismatchError
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
    from aapo_megatron.checkpoint.hf import copy_files
    from aapo_megatron.checkpoint.hf_writer import write_config

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
    from aapo_megatron.models.mapping import WeightMapping

    mapping = WeightMapping(spec, naming="te")
    out = {}
    for g in mapping.global_groups():
        out[g.megatron_name] = mapping.megatron_shape(g.megatron_name)
    for g in mapping.layer_groups(0):
        key = g.megatron_name.replace("decoder.layers.0.", "decoder.layers.", 1)
        out[key] = (spec.num_layers,) + mapping.megatron_shape(g.megatron_name)
    return out


def validate_mcore_checkpoint(ckpt_dir: str, spec: ArchSpec) -> torch.dtype:
    """Check that every tensor `spec` needs is in the checkpoint with the right global shape; return the weights' dtype.

    The dtype is the embedding's (Megatron's local-spec norms stay float32 in a bf16 model).
    """
    stored = checkpoint_tensors(ckpt_dir)
    for key, shape in expected_checkpoint_shapes(spec).items():
        if key not in stored:
            raise MissingTensorError(
                f"tensor '{key}' is missing from the Megatron checkpoint {ckpt_dir} "
                f"({spec.hf_architecture} with tie_word_embeddings={spec.tie_word_embeddings} needs it)"
            )
        got, _ = stored[key]
        if key in _VOCAB_KEYS and got[1:] == shape[1:] and got[0] >= shape[0]:
            continue  # saved at a TP that padded the vocabulary; the extra rows are dropped on load
        if got != shape:
            raise ShapeMismatchError(
                f"tensor '{key}' has shape {list(got)} in the Megatron checkpoint {ckpt_dir} "
                f"but the architecture needs {list(shape)}"
            )
    from aapo_megatron.models.mapping import EMBEDDING

    return stored[EMBEDDING][1]


_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _swiglu_factories(sharded_sd: dict) -> list[str]:
    """Keys of Megatron's SwiGLU ShardedTensorFactory entries (linear_fc1 = [gate; up], saved as two halves)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return [k for k, v in sharded_sd.items() if isinstance(v, ShardedTensorFactory) and k.endswith("linear_fc1.weight")]


def save_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str, release_weights: bool = False) -> None:
    """Save this rank's part of `model` with dist_checkpointing (torch_dist); collective over all ranks.

    release_weights=True (for converters, which drop the model afterwards) keeps peak memory at the model size:
    Megatron's writer clones every non-contiguous view, i.e. all gate/up halves of linear_fc1 at once; here each
    fc1 is split into two owned halves one at a time and the original storage freed. The model is unusable after.
    """
    from megatron.core import dist_checkpointing

    from aapo_megatron.models.weights import unwrap_model

    os.makedirs(ckpt_dir, exist_ok=True)
    sharded_sd = unwrap_model(model).sharded_state_dict()
    if release_weights:
        for key in _swiglu_factories(sharded_sd):
            factory = sharded_sd[key]
            halves = factory.build()  # two ShardedTensors viewing the [gate; up] rows
            for half in halves:
                half.data = half.data.clone()
            factory.data.untyped_storage().resize_(0)  # free the fused weight; the halves own the data now
            sharded_sd[key] = halves
    dist_checkpointing.save(sharded_sd, ckpt_dir)


@torch.no_grad()
def load_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str) -> None:
    """Fill this rank's `model` (any TP/PP) from a dist_checkpointing directory; collective over all ranks.

    The directory may be an aapo-convert output or a trainer checkpoint's model/ (its optimizer state is ignored).
    Model `_extra_state` entries the checkpoint lacks (TE modules, checkpoint written with the local spec) keep their
    initial value; any other absent entry is a MissingTensorError naming it (`checkpoint.extra_state`).

    Tensors are read in place into the parameters. For linear_fc1 the gate and up halves are read straight
    into views of the parameter, instead of Megatron's default of loading both and concatenating a copy.
    """
    from aapo_megatron.checkpoint.extra_state import load_module_state, load_tolerating_extra_state
    from aapo_megatron.models.weights import unwrap_model

    if not is_mcore_checkpoint(ckpt_dir):
        raise ConversionError(f"{ckpt_dir} is not a Megatron dist_checkpointing checkpoint (no metadata.json)")
    model = unwrap_model(model)
    sharded_sd = model.sharded_state_dict()
    model_keys = set(sharded_sd)
    padded = _reroute_vocab_rows(sharded_sd, checkpoint_tensors(ckpt_dir))
    fused = {}
    for key in _swiglu_factories(sharded_sd):
        fused[key] = sharded_sd[key].data  # the parameter's tensor
        sharded_sd[key] = sharded_sd[key].build()  # two ShardedTensors viewing its halves: loaded in place
    # A trainer checkpoint's common.pt also holds non-model state (the optimizer's), which load() returns too.
    state = {k: v for k, v in load_tolerating_extra_state(sharded_sd, ckpt_dir).items() if k in model_keys}
    for key, tensor in fused.items():
        halves = state[key]
        if not all(h.data_ptr() == v.data_ptr() for h, v in zip(halves, tensor.chunk(2, dim=0))):
            state[key] = torch.cat(halves)  # the loader made copies after all: merge them as Megatron would
        else:
            state[key] = tensor
    for key, (target, start, full) in padded.items():
        rows = max(0, min(target.shape[0], full.shape[0] - start))
        target[:rows].copy_(full[start:start + rows])
        target[rows:].zero_()  # Megatron's vocab padding rows
        state[key] = target
    load_module_state(model, state, ckpt_dir)


def _reroute_vocab_rows(sharded_sd: dict, stored: dict) -> dict:
    """Load vocab tensors whose row count differs from the checkpoint's into a full-size buffer instead.

    Megatron pads the vocabulary to a multiple of TP, so a checkpoint written at one TP can have a different
    number of embedding/output rows than the model at another TP. Such tensors are read whole (every rank) and
    this rank's rows copied afterwards. Returns {key: (parameter rows [Vp/tp, H], first global row, buffer)}.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for key, sh in list(sharded_sd.items()):
        if not isinstance(sh, ShardedTensor) or sh.key not in _VOCAB_KEYS or sh.key not in stored:
            continue
        shape = stored[sh.key][0]
        if shape[0] == sh.global_shape[0] or tuple(shape[1:]) != tuple(sh.global_shape[1:]):
            continue
        full = torch.empty(shape, dtype=sh.data.dtype)  # [V_ckpt, H]
        # the whole tensor on every TP rank: TP ranks > 0 become replicas (one main replica per shard)
        replica_id = (sh.replica_id[0], ps.get_tensor_model_parallel_rank(), *sh.replica_id[2:])
        sharded_sd[key] = ShardedTensor.from_rank_offsets(sh.key, full, replica_id=replica_id)
        out[key] = (sh.data, sh.global_offset[0], full)
    return out


class CheckpointTensorReader:
    """Regions of a torch_dist checkpoint's tensors, read straight from its .distcp files (no Megatron, no ranks).

    Each stored chunk overlapping the region is loaded on its own (torch's DCP storage format) and dropped once
    copied, so reading one layer of a stacked [L, ...] tensor costs that layer, whatever TP/PP the checkpoint was
    saved at (resharding is the overlap of the requested region with the stored chunks).

        reader = CheckpointTensorReader(ckpt)
        qkv = reader.read("decoder.layers.self_attention.linear_qkv.weight", (7, 0, 0), (1, 3072, 2048))
    """

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.ckpt_dir = ckpt_dir
        self._reader = FileSystemReader(ckpt_dir)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable checkpoint
            raise ConversionError(f"cannot read the torch_dist metadata of {ckpt_dir}: {exc}") from exc
        self._reader.set_up_storage_reader(self.metadata, True)

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """Region [offsets, offsets + sizes) of the global tensor `key`, in its stored dtype.

        When a single stored chunk holds the region it is returned as a view of that chunk (no extra copy).
        """
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "chunks"):
            raise MissingTensorError(f"tensor '{key}' is missing from the Megatron checkpoint {self.ckpt_dir}")
        want = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [want])
        if sum(math.prod(item.lengths) for item in items) != math.prod(sizes):
            raise ConversionError(f"the Megatron checkpoint {self.ckpt_dir} does not store all of tensor '{key}' "
                                  f"at offsets {list(offsets)} sizes {list(sizes)}")
        out = None
        for item in sorted(items, key=lambda it: (self._reader.storage_data[it.storage_index].relative_path,
                                                  self._reader.storage_data[it.storage_index].offset)):
            piece = _narrow(self._load_chunk(item), item.storage_offsets, item.lengths)
            if len(items) == 1:
                return piece
            if out is None:
                out = torch.empty(sizes, dtype=md.properties.dtype)
            _narrow(out, item.dest_offsets, item.lengths).copy_(piece)
            del piece
        return out

    def _load_chunk(self, item) -> torch.Tensor:
        """One stored chunk (whole), loaded from its file slice."""
        info = self._reader.storage_data[item.storage_index]
        with open(os.path.join(self.ckpt_dir, info.relative_path), "rb") as f:
            stream = self._reader.transforms.transform_load_stream(item, info.transform_descriptors or (),
                                                                    self._reader._slice_file(f, info))
            if not stream.seekable():  # torch.load needs to seek (as FileSystemReader.read_data does)
                stream = io.BytesIO(stream.read(-1))
            return torch.load(stream, map_location="cpu", weights_only=True)


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, length)
    return tensor
