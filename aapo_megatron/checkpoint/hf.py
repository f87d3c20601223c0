"""Streaming safetensors reading of Hugging Face checkpoint directories (writing: `checkpoint.hf_writer`).

Reading never holds more than the tensors asked for: headers are parsed
without touching tensor data (so a 70B index is cheap to validate), and each
`load` opens a shard, copies out the requested tensors and closes it again
(the mmap is released, so its pages leave the RSS).

    reader = HFCheckpointReader("/ckpt/Qwen2.5-7B")
    reader.check("model.norm.weight", (3584,))
    tensors = reader.load(["model.layers.0.mlp.up_proj.weight", ...])
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from aapo_megatron.checkpoint.errors import ConversionError, CorruptShardError, MissingTensorError, ShapeMismatchError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Files that hold weights in some format; everything else at the top level (tokenizer, generation config,
# chat template, README, license) is carried along unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_CARRIED = {INDEX_NAME, CONFIG_NAME, "pytorch_model.bin.index.json"}

# safetensors dtype tag -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a shard header (no data touched)."""

    name: str
    file: str
    """Absolute path of the shard."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0
    """Byte offset of the tensor's data in the file (8 + header length + begin)."""


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1.5GiB' / 1234 -> bytes (decimal units as in HF's max_shard_size, binary for *iB)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    value, unit = float(m.group(1)), m.group(2).upper()
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if unit not in scale:
        raise ValueError(f"cannot parse size {text!r}; unknown unit {unit!r}")
    return int(value * scale[unit])


def read_shard_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; CorruptShardError (naming the file) if truncated or malformed."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ConversionError(f"cannot read safetensors shard {path}: {exc.strerror}") from exc
    if size < 8:
        raise CorruptShardError(f"corrupt safetensors shard {path}: file is {size} bytes, too short for a header")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CorruptShardError(
                f"corrupt safetensors shard {path}: header length {header_len} exceeds the file size {size} "
                "(truncated or not a safetensors file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptShardError(f"corrupt safetensors shard {path}: bad header ({exc})") from exc
    data_size = size - 8 - header_len
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptShardError(f"corrupt safetensors shard {path}: bad header entry for tensor '{name}'") from exc
        if tag not in SAFETENSORS_DTYPES:
            raise CorruptShardError(f"corrupt safetensors shard {path}: tensor '{name}' has unknown dtype {tag!r}")
        dtype, itemsize = SAFETENSORS_DTYPES[tag]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * itemsize or begin < 0:
            raise CorruptShardError(
                f"corrupt safetensors shard {path}: tensor '{name}' spans bytes [{begin}, {end}) "
                f"but shape {list(shape)} of {tag} needs {numel * itemsize} bytes"
            )
        if end > data_size:
            raise CorruptShardError(
                f"corrupt safetensors shard {path}: tensor '{name}' ends at byte {end} but the file holds only "
                f"{data_size} data bytes (truncated)"
            )
        out[name] = TensorInfo(name, os.path.abspath(path), dtype, shape, end - begin, 8 + header_len + begin)
    return out


class HFCheckpointReader:
    """Read-only view of an HF directory (config.json + model.safetensors or an index with shards)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = os.path.abspath(hf_dir)
        if not os.path.isdir(self.hf_dir):
            raise ConversionError(f"HF checkpoint directory {hf_dir} does not exist")
        config_path = os.path.join(self.hf_dir, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ConversionError(f"{config_path} not found: an HF checkpoint directory needs a config.json")
        with open(config_path) as f:
            try:
                self.config: dict = json.load(f)
            except ValueError as exc:
                raise ConversionError(f"{config_path} is not valid JSON: {exc}") from exc
        self.files = self._discover_files()
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_shard_header(path).items():
                self.tensors[name] = info
        if self._index is not None:
            for name, fname in self._index.items():
                path = os.path.join(self.hf_dir, fname)
                if name not in self.tensors or self.tensors[name].file != path:
                    raise MissingTensorError(
                        f"tensor '{name}' is listed in {INDEX_NAME} under {fname} but that shard does not contain it"
                    )

    def _discover_files(self) -> list[str]:
        index_path = os.path.join(self.hf_dir, INDEX_NAME)
        self._index: dict[str, str] | None = None
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    self._index = dict(json.load(f)["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptShardError(f"corrupt index {index_path}: {exc}") from exc
            files = list(dict.fromkeys(self._index.values()))  # ordered, unique
            for fname in files:
                if not os.path.isfile(os.path.join(self.hf_dir, fname)):
                    raise ConversionError(f"shard {fname} listed in {index_path} is missing from {self.hf_dir}")
            return [os.path.join(self.hf_dir, f) for f in files]
        single = os.path.join(self.hf_dir, SINGLE_NAME)
        if os.path.isfile(single):
            return [single]
        found = sorted(f for f in os.listdir(self.hf_dir) if f.endswith(".safetensors"))
        if len(found) == 1:
            return [os.path.join(self.hf_dir, found[0])]
        if found:
            raise ConversionError(
                f"{self.hf_dir} holds {len(found)} .safetensors files but no {INDEX_NAME} saying which tensor is where"
            )
        raise ConversionError(f"no safetensors weights in {self.hf_dir} (expected {SINGLE_NAME} or {INDEX_NAME})")

    # ------------------------------------------------------------------ metadata
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        """All tensor names, in shard order."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """TensorInfo of `name`; MissingTensorError naming it if absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"tensor '{name}' is missing from the checkpoint {self.hf_dir}") from None

    def check(self, name: str, shape: Sequence[int]) -> TensorInfo:
        """TensorInfo of `name` after checking its shape; ShapeMismatchError names the tensor and both shapes."""
        info = self.info(name)
        if tuple(info.shape) != tuple(shape):
            raise ShapeMismatchError(
                f"tensor '{name}' has shape {list(info.shape)} in {os.path.basename(info.file)} "
                f"but the architecture needs {list(shape)}"
            )
        return info

    @property
    def total_bytes(self) -> int:
        """Sum of all tensor sizes in bytes."""
        return sum(i.nbytes for i in self.tensors.values())

    @property
    def max_shard_bytes(self) -> int:
        """Size of the largest shard file in bytes."""
        return max(os.path.getsize(p) for p in self.files)

    def carried_files(self) -> list[str]:
        """Top-level non-weight files (tokenizer, generation config, ...) to copy next to a converted checkpoint."""
        return carried_files(self.hf_dir)

    # ------------------------------------------------------------------ data
    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly `names` (each an independent CPU tensor), opening each shard involved once."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.info(name).file].append(name)
        out: dict[str, torch.Tensor] = {}
        for path in self.files:  # shard order: sequential reads
            if path in by_file:
                out.update(_read_from_shard(path, by_file[path]))
        return out

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file I/O into a fresh CPU tensor (no mmap: RSS grows by its size only)."""
        info = self.info(name)
        tensor = torch.empty(info.shape, dtype=info.dtype)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(byte_view(tensor))
        if got != info.nbytes:
            raise CorruptShardError(f"corrupt safetensors shard {info.file}: tensor '{name}' is truncated "
                                    f"(read {got} of {info.nbytes} bytes)")
        return tensor

    def iter_shards(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Yield (shard path, all its tensors), one shard in memory at a time."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, info in self.tensors.items():
            by_file[info.file].append(name)
        for path in self.files:
            yield path, _read_from_shard(path, by_file[path])


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Writable memoryview over a contiguous CPU tensor's bytes (no copy; any dtype, including bfloat16).

    Built from the data pointer rather than through numpy, which would mark the storage non-resizable. The view
    does not keep the tensor alive: the caller must hold it while the view is used.
    """
    if not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _read_from_shard(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                # get_tensor copies out of the mmap, so the tensor outlives the closed file
                out[name] = f.get_tensor(name)
    except SafetensorError as exc:
        raise CorruptShardError(f"corrupt safetensors shard {path}: {exc}") from exc
    return out


def carried_files(hf_dir: str) -> list[str]:
    """Names of top-level files in `hf_dir` that are neither weights, the index nor config.json."""
    out = []
    for fname in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, fname)
        if not os.path.isfile(path) or fname.startswith(".") or fname in _NOT_CARRIED:
            continue
        if fname.endswith(_WEIGHT_SUFFIXES):
            continue
        out.append(fname)
    return out


def copy_files(src_dir: str, dst_dir: str, names: Iterable[str]) -> None:
    """Copy `names` from src_dir to dst_dir (metadata preserved)."""
    os.makedirs(dst_dir, exist_ok=True)
    for fname in names:
        shutil.copy2(os.path.join(src_dir, fname), os.path.join(dst_dir, fname))
