"""Writing HF safetensors checkpoints: size-capped shards, then HF's shard names and index.

Shards are written under provisional names; a final step (possibly in another process)
renames them to HF's `model-0000i-of-0000N.safetensors` and writes `model.safetensors.index.json`:

    writer = SafetensorsShardWriter(out_dir, parse_size("5GB"))
    writer.add("model.norm.weight", tensor); ...
    finalize_shards(out_dir, writer.close())
    write_config(out_dir, to_hf_config(spec))
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

from aapo_megatron.checkpoint.errors import ConversionError
from aapo_megatron.checkpoint.hf import CONFIG_NAME, INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME, byte_view

@dataclass
class ShardPart:
    """One written shard under a provisional name; `finalize_shards` gives it its HF name."""

    filename: str
    names: list[str]
    nbytes: int


class SafetensorsShardWriter:
    """Buffer tensors and write a shard whenever the next tensor would push it past max_shard_bytes."""

    def __init__(self, out_dir: str, max_shard_bytes: int, tag: str = "0"):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.tag = tag
        self.parts: list[ShardPart] = []
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (made contiguous); may flush the current shard first."""
        if name in self._buf or any(name in p.names for p in self.parts):
            raise ValueError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += nbytes

    def flush(self) -> None:
        """Write the buffered tensors as one shard."""
        if not self._buf:
            return
        from safetensors.torch import save_file

        fname = f"part-{self.tag}-{len(self.parts):05d}.safetensors"
        save_file(self._buf, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        self.parts.append(ShardPart(fname, list(self._buf), self._buf_bytes))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[ShardPart]:
        """Flush and return the parts written, in order."""
        self.flush()
        return self.parts


def finalize_shards(out_dir: str, parts: Sequence[ShardPart]) -> dict[str, str]:
    """Rename provisional parts to HF shard names and write the index (one part: model.safetensors); returns weight_map."""
    if not parts:
        raise ConversionError("no tensors were written")
    n = len(parts)
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts):
        final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, part.filename), os.path.join(out_dir, final))
        for name in part.names:
            weight_map[name] = final
    if n > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in parts)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return weight_map


def write_config(out_dir: str, config: dict) -> None:
    """Write config.json (sorted keys, HF style)."""
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


# safetensors dtype tag of each torch dtype (the inverse of SAFETENSORS_DTYPES)
_TAGS: dict[torch.dtype, str] = {dtype: tag for tag, (dtype, _) in SAFETENSORS_DTYPES.items()}

TensorLayout = tuple[str, torch.dtype, tuple[int, ...]]
"""(name, dtype, shape) of one tensor to be written."""


def plan_shards(layout: Sequence[TensorLayout], max_shard_bytes: int) -> list[list[TensorLayout]]:
    """Split tensors (in order) into shards: a new shard starts when the next tensor would push it past the cap."""
    shards: list[list[TensorLayout]] = []
    size = 0
    for entry in layout:
        _, dtype, shape = entry
        nbytes = math.prod(shape) * dtype.itemsize
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class SafetensorsStreamWriter:
    """Write tensors straight into size-capped safetensors shards, in an order declared up front; nothing is buffered.

    Because every name, dtype and shape is known before the first byte, each shard's header is written when its
    first tensor arrives and each tensor's bytes go from its own memory to the file. Memory: the tensor being
    written, not the shard. Shards follow `plan_shards` (the same split as `SafetensorsShardWriter`).
    """

    def __init__(self, out_dir: str, max_shard_bytes: int, layout: Sequence[TensorLayout], tag: str = "0"):
        self.out_dir = out_dir
        self.tag = tag
        self.parts: list[ShardPart] = []
        self._shards = plan_shards(layout, max_shard_bytes)
        self._order = [entry for shard in self._shards for entry in shard]
        self._next = 0  # index into _order of the next tensor expected
        self._file = None
        self._shard = -1

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the one the layout names next, with that dtype and shape."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor '{name}' is not in the layout (all {len(self._order)} tensors were written)")
        want_name, want_dtype, want_shape = self._order[self._next]
        if name != want_name:
            raise ValueError(f"tensor '{name}' written out of order: the layout expects '{want_name}' next")
        if tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise ValueError(f"tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, the layout declares "
                             f"{want_dtype} {list(want_shape)}")
        if self._file is None:
            self._open_next_shard()
        data = tensor.contiguous()  # kept alive while its bytes are written (the view does not own them)
        self._file.write(byte_view(data))
        del data
        self._next += 1
        self._left -= 1
        if self._left == 0:
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        self._shard += 1
        entries = self._shards[self._shard]
        header: dict = {"__metadata__": {"format": "pt"}}
        begin = 0
        for name, dtype, shape in entries:
            end = begin + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [begin, end]}
            begin = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        fname = f"part-{self.tag}-{self._shard:05d}.safetensors"
        self._file = open(os.path.join(self.out_dir, fname), "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self.parts.append(ShardPart(fname, [e[0] for e in entries], begin))
        self._left = len(entries)

    def close(self) -> list[ShardPart]:
        """The parts written, in order; ValueError naming the first missing tensor if the layout is not complete."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next < len(self._order):
            raise ValueError(f"tensor '{self._order[self._next][0]}' was never written "
                             f"({len(self._order) - self._next} of {len(self._order)} missing)")
        return self.parts
