"""`shm`: same-host weight transport through shared-memory files (CPU hosts, and servers on this host).

Buckets travel through /dev/shm and the engine's worker extension (`worker_extension.WeightSyncExtension`) loads
them. An in-process engine uses two reusable slot files (`ShmSlots`, double-buffered, mapped by both processes
once): a bucket costs one copy on each side and no tmpfs page allocation. The rollout server path writes one
safetensors file per bucket and deletes it. Either way at most two buckets exist at once (the one being loaded
and the one being written). Only for engines on this host: their /dev/shm is this one's.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from aapo_megatron.rollout.scratch_dirs import owned_tempdir
from aapo_megatron.rollout.transport.base import (
    BucketSink,
    NamedTensors,
    SyncStats,
    WeightTransport,
    stream_buckets,
)


def _write_bucket(bucket: list[tuple[str, torch.Tensor]], path: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    ptrs: set[tuple[int, int]] = set()
    for name, t in bucket:
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in ptrs or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses shared / partial storages
        ptrs.add(key)
        tensors[name] = t
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def default_shm_dir() -> str:
    """/dev/shm when it exists (RAM-backed), else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


@dataclass
class FileSink:
    """The receiving side of a file-based sync: begin, load(payload) per bucket, finish, abort (after a failure)."""

    begin: Callable[[], Any]
    load: Callable[[Any], Any]
    finish: Callable[[], Any]
    abort: Callable[[], Any]
    write: Optional[Callable[[list[tuple[str, torch.Tensor]], int], Any]] = None
    """write(bucket, k) -> the payload `load` takes. None: a safetensors file per bucket (payload: its path,
    deleted after the load)."""


_SLOT_ALIGN = 64


class ShmSlots:
    """Two reusable shared-memory bucket files (double buffer) for an engine on this host.

    Bucket k goes to slot k % 2 (the sync loop never writes a slot the engine is still reading). A slot's
    file grows to the largest bucket seen and is then reused: after the first sync, a bucket costs one copy
    into already-allocated pages, and the engine maps each file once. Holds up to 2 x the largest bucket of
    /dev/shm until `close()` (also called at garbage collection and interpreter exit).
    """

    def __init__(self, shm_dir: Optional[str] = None):
        self.dir = owned_tempdir("aapo-wslots-", shm_dir or default_shm_dir())
        self._slots: list[Optional[tuple[str, int, Any, torch.Tensor]]] = [None, None]  # path, capacity, mmap, u8
        self._files = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)

    def write(self, bucket: list[tuple[str, torch.Tensor]], k: int) -> tuple[str, int, list]:
        """Copy a bucket into slot k % 2; returns (path, slot, [[name, dtype, shape, byte offset], ...])."""
        entries, offset = [], 0
        for name, t in bucket:
            entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
            offset += -(-t.numel() * t.element_size() // _SLOT_ALIGN) * _SLOT_ALIGN
        slot = k % 2
        path, buf = self._ensure(slot, max(offset, _SLOT_ALIGN))
        for (_, t), (_, _, _, off) in zip(bucket, entries):
            nbytes = t.numel() * t.element_size()
            buf[off:off + nbytes].view(t.dtype).view(t.shape).copy_(t)
        return path, slot, entries

    def _ensure(self, slot: int, nbytes: int) -> tuple[str, torch.Tensor]:
        cur = self._slots[slot]
        if cur is not None and cur[1] >= nbytes:
            return cur[0], cur[3]
        if cur is not None:
            self._release(slot)
        self._files += 1
        path = os.path.join(self.dir, f"slot{slot}_{self._files}.bin")  # a new name: the engine remaps it
        with open(path, "w+b") as fh:
            fh.truncate(nbytes)
            mm = mmap.mmap(fh.fileno(), nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        buf = torch.frombuffer(mm, dtype=torch.uint8)
        self._slots[slot] = (path, nbytes, mm, buf)
        return path, buf

    def _release(self, slot: int) -> None:
        cur = self._slots[slot]
        self._slots[slot] = None
        if cur is None:
            return
        path = cur[0]
        del cur  # no mmap.close(): a tensor viewing the map keeps it alive, and closing would leave it dangling
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap and delete both slot files."""
        for slot in range(2):
            self._release(slot)
        self._finalizer()


def stream_via_files(sink: FileSink, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int,
                     timeout_s: float, dtype: Optional[torch.dtype] = None, shm_dir: Optional[str] = None,
                     on_begin: Optional[Callable[[], None]] = None) -> SyncStats:
    """Stream HF-named tensors to `sink` as bucket files in shm (`stream_buckets`); returns the stats.

    Per-bucket files (sink.write None) live in a scratch directory removed even on failure, after the bucket
    being written ends.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"weight sync bucket size must be > 0 bytes, got {bucket_bytes}")
    if sink.write is not None:
        return stream_buckets(BucketSink(sink.begin, sink.write, sink.load, sink.finish, sink.abort), named_tensors,
                              transport="shm", bucket_bytes=bucket_bytes, timeout_s=timeout_s, dtype=dtype,
                              on_begin=on_begin)
    workdir = owned_tempdir("aapo-wsync-", shm_dir or default_shm_dir())

    def write(bucket: list[tuple[str, torch.Tensor]], k: int) -> str:
        path = os.path.join(workdir, f"bucket_{k:05d}.safetensors")
        _write_bucket(bucket, path)
        return path

    files = BucketSink(begin=sink.begin, write=write, load=sink.load, finish=sink.finish, abort=sink.abort,
                       release=os.remove, cleanup=lambda: shutil.rmtree(workdir, ignore_errors=True))
    return stream_buckets(files, named_tensors, transport="shm", bucket_bytes=bucket_bytes, timeout_s=timeout_s,
                          dtype=dtype, on_begin=on_begin)


class ShmTransport(WeightTransport):
    """`shm` into an in-process `vllm.LLM` (with WeightSyncExtension) on this host: reusable `ShmSlots`."""

    name = "shm"

    @classmethod
    def for_engine(cls, llm: Any, shm_dir: Optional[str] = None) -> "ShmTransport":
        """Slot files under `shm_dir`, loaded by the engine's worker extension."""
        return cls(llm, shm_dir)

    def __init__(self, llm: Any, shm_dir: Optional[str] = None):
        self.llm = llm
        self.shm_dir = shm_dir
        self.slots: Optional[ShmSlots] = None  # made on the first sync

    def sync(self, named_tensors: NamedTensors, *, bucket_bytes: int, timeout_s: float,
             dtype: Optional[torch.dtype] = None, on_begin: Optional[Callable[[], None]] = None) -> SyncStats:
        """Stream the tensors through the two slot files; returns the stats."""
        if self.slots is None:
            self.slots = ShmSlots(self.shm_dir)
        rpc_timeout = timeout_s + 5.0  # the StageRunner timeout fires first and names the stage

        def rpc(method: str, *args: Any) -> Any:
            return self.llm.collective_rpc(method, timeout=rpc_timeout, args=args)

        sink = FileSink(begin=lambda: rpc("aapo_begin_weight_update"),
                        load=lambda payload: rpc("aapo_load_weights_shm", *payload),
                        finish=lambda: rpc("aapo_finish_weight_update"),
                        abort=lambda: rpc("aapo_finish_weight_update"), write=self.slots.write)
        return stream_via_files(sink, named_tensors, bucket_bytes=bucket_bytes, timeout_s=timeout_s, dtype=dtype,
                                on_begin=on_begin)

    def close(self) -> None:
        """Delete the slot files."""
        if self.slots is not None:
            self.slots.close()
            self.slots = None
