"""Weight sync, trainer -> vLLM policy engine: HF-named tensors streamed in buckets, every stage timed out.

Transports (picked by `choose_transport`):
- "shm": CPU / same host. Buckets travel through /dev/shm and the engine's worker extension
  (`worker_extension.WeightSyncExtension`) loads them. An in-process engine uses two reusable slot files
  (`ShmSlots`, double-buffered, mapped by both processes once): a bucket costs one copy on each side and no
  tmpfs page allocation. The rollout server path writes one safetensors file per bucket and deletes it.
  Either way at most two buckets exist at once (the one being loaded and the one being written).
- "nccl": GPU. vLLM's weight-transfer NCCL backend (`vllm.distributed.weight_transfer`): the trainer opens
  rank 0 of a trainer+workers NCCL group and broadcasts each bucket while the workers receive it through
  `LLM.update_weights`. Written against vLLM 0.32's protocol; it cannot run on this CPU-only machine.

Stages ("begin", "gather", "write bucket k", "load bucket k", "finish", ...) run on a worker thread and
are waited on with a timeout; one that hangs raises `WeightSyncTimeout` naming the stage.
"""

from __future__ import annotations

import mmap
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import torch

from aapo_megatron.rollout.scratch_dirs import owned_tempdir

Transport = Literal["shm", "nccl"]


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the stage."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A weight sync stage did not finish within the timeout."""


@dataclass
class SyncStats:
    """What one weight sync moved and how long each stage took."""

    transport: str
    """'shm' or 'nccl'."""
    num_tensors: int = 0
    """Tensors sent."""
    num_bytes: int = 0
    """Bytes sent (after the dtype cast)."""
    num_buckets: int = 0
    """Buckets sent."""
    seconds: float = 0.0
    """Wall time of the whole sync, seconds."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Summed seconds per stage kind (gather, write, load, begin, finish)."""

    @property
    def gb_per_s(self) -> float:
        """Throughput, 1e9 bytes per second."""
        return self.num_bytes / max(self.seconds, 1e-9) / 1e9


def choose_transport(device: torch.device | str | None = None) -> Transport:
    """'nccl' when the trainer's weights live on CUDA, else 'shm' (CPU, same host)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if torch.device(device).type == "cuda" else "shm"


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: Optional[torch.dtype] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most `bucket_bytes` bytes (a larger tensor goes alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in the weight stream")
        seen.add(name)
        t = tensor.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def bucket_nbytes(bucket: list[tuple[str, torch.Tensor]]) -> int:
    """Bytes held by a bucket."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


class StageRunner:
    """Runs sync stages on one worker thread; waits for each with a timeout and names the stage that hung."""

    def __init__(self, timeout_s: float, what: str = "weight sync"):
        self.timeout_s = float(timeout_s)
        self.what = what
        self.stage_seconds: dict[str, float] = {}
        self.timed_out = False
        device = torch.cuda.current_device() if torch.cuda.is_available() else None

        def _init() -> None:  # the thread inherits the caller's CUDA device
            if device is not None:
                torch.cuda.set_device(device)

        self._pool = _DaemonWorker("aapo-wsync", _init)

    def submit(self, stage: str, fn: Callable[[], Any]) -> tuple[str, float, Future]:
        """Start a stage; returns a handle for `wait`."""
        return stage, time.perf_counter(), self._pool.submit(fn)

    def wait(self, handle: tuple[str, float, Future]) -> Any:
        """Wait for a submitted stage; WeightSyncTimeout names it when it exceeds the timeout."""
        stage, t0, fut = handle
        remaining = self.timeout_s - (time.perf_counter() - t0)
        try:
            result = fut.result(timeout=max(remaining, 0.0))
        except FutureTimeout:
            self.timed_out = True
            raise WeightSyncTimeout(
                f"{self.what}: stage '{stage}' did not finish within {self.timeout_s:g} s "
                f"(rollout.weight_sync_timeout_s); the engine or the weight source is hung") from None
        except WeightSyncError:
            raise
        except BaseException as exc:
            raise WeightSyncError(f"{self.what}: stage '{stage}' failed: {type(exc).__name__}: {exc}") from exc
        kind = stage.split(" ")[0]
        self.stage_seconds[kind] = self.stage_seconds.get(kind, 0.0) + time.perf_counter() - t0
        return result

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        """Run one stage to completion (with the timeout)."""
        return self.wait(self.submit(stage, fn))

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the worker thread after its queued stages; waits up to `wait_s` seconds for them to finish
        (never once a stage has timed out: that one is hung)."""
        self._pool.shutdown(0.0 if self.timed_out else wait_s)


class _DaemonWorker:
    """One daemon thread running submitted callables in order. Unlike ThreadPoolExecutor's workers, a stage
    hung on a dead engine (abandoned after its timeout) never blocks interpreter exit."""

    def __init__(self, name: str, initializer: Callable[[], None]):
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(initializer,), name=name, daemon=True)
        self._thread.start()

    def _loop(self, initializer: Callable[[], None]) -> None:
        initializer()
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Queue fn; its Future completes when the worker has run it."""
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    def shutdown(self, wait_s: float = 0.0) -> None:
        """Ask the worker to stop after the queued calls; waits up to `wait_s` seconds for it to exit."""
        self._queue.put(None)
        if wait_s > 0 and self._thread is not threading.current_thread():
            self._thread.join(wait_s)


def _next_bucket(it: Iterator[list[tuple[str, torch.Tensor]]]) -> Optional[list[tuple[str, torch.Tensor]]]:
    return next(it, None)


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
    """Stream HF-named tensors to `sink` as safetensors bucket files (in shm); returns the stats.

    Bucket k+1 is gathered and written while the sink loads bucket k, so at most two buckets exist at once.
    Per-bucket files (sink.write None) are removed even on failure, after the bucket being written ends. A
    failure after `begin` calls `sink.abort` (unless the sink itself hung) and re-raises; the receiver may then
    hold a mix of old and new weights.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"weight sync bucket size must be > 0 bytes, got {bucket_bytes}")
    stats = SyncStats(transport="shm")
    t_start = time.perf_counter()
    gather = StageRunner(timeout_s, "weight sync")   # gathers + writes buckets
    engine = StageRunner(timeout_s, "weight sync")   # drives the receiver
    workdir = None if sink.write is not None else owned_tempdir("aapo-wsync-", shm_dir or default_shm_dir())
    began = finished = False
    try:
        buckets = iter_buckets(named_tensors, bucket_bytes, dtype)
        engine.run("begin", sink.begin)
        began = True
        if on_begin is not None:
            on_begin()

        def produce(k: int) -> Optional[tuple[Any, int, int]]:
            bucket = _next_bucket(buckets)
            if bucket is None:
                return None
            if sink.write is not None:
                return sink.write(bucket, k), len(bucket), bucket_nbytes(bucket)
            path = os.path.join(workdir, f"bucket_{k:05d}.safetensors")
            _write_bucket(bucket, path)
            return path, len(bucket), bucket_nbytes(bucket)

        k = 0
        pending = gather.submit(f"gather+write bucket {k}", lambda: produce(0))
        while True:
            item = gather.wait(pending)
            if item is None:
                break
            payload, n, nbytes = item
            load = engine.submit(f"load bucket {k}", lambda p=payload: sink.load(p))
            pending = gather.submit(f"gather+write bucket {k + 1}", lambda k1=k + 1: produce(k1))
            engine.wait(load)
            if sink.write is None:
                os.remove(payload)
            stats.num_tensors += n
            stats.num_bytes += nbytes
            stats.num_buckets += 1
            k += 1
        if stats.num_tensors == 0:
            raise WeightSyncError("weight sync: the weight stream was empty (no tensors to send)")
        engine.run("finish", sink.finish)
        finished = True
    finally:
        if began and not finished and not engine.timed_out:
            try:  # close the session so the engine's layers leave reload mode
                engine.run("abort", sink.abort)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        # A failed load leaves the next bucket's write running: let it end before its directory goes.
        gather.close(wait_s=gather.timeout_s)
        engine.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    stats.stage_seconds = {**gather.stage_seconds, **engine.stage_seconds}
    stats.seconds = time.perf_counter() - t_start
    return stats


def sync_shm(llm: Any, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int,
             timeout_s: float, dtype: Optional[torch.dtype] = None, shm_dir: Optional[str] = None,
             on_begin: Optional[Callable[[], None]] = None, slots: Optional[ShmSlots] = None) -> SyncStats:
    """Stream HF-named tensors into a vLLM `LLM` (with WeightSyncExtension) through shm: reusable `slots`
    when given, else one safetensors file per bucket."""
    rpc_timeout = timeout_s + 5.0  # the StageRunner timeout fires first and names the stage

    def rpc(method: str, *args: Any) -> Any:
        return llm.collective_rpc(method, timeout=rpc_timeout, args=args)

    if slots is not None:
        load = lambda payload: rpc("aapo_load_weights_shm", *payload)  # noqa: E731
    else:
        load = lambda path: rpc("aapo_load_weights_file", path)  # noqa: E731
    sink = FileSink(begin=lambda: rpc("aapo_begin_weight_update"), load=load,
                    finish=lambda: rpc("aapo_finish_weight_update"),
                    abort=lambda: rpc("aapo_finish_weight_update"),
                    write=None if slots is None else slots.write)
    return stream_via_files(sink, named_tensors, bucket_bytes=bucket_bytes, timeout_s=timeout_s, dtype=dtype,
                            shm_dir=shm_dir, on_begin=on_begin)


# --------------------------------------------------------------------------- GPU: vLLM NCCL weight transfer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NcclWeightTransfer:
    """Trainer side of vLLM's NCCL weight transfer to an `LLM(weight_transfer_config={"backend": "nccl"})`.

    One NCCL group (trainer rank 0 + the engine's workers) is opened on first use and kept. Each bucket is
    announced with `LLM.update_weights` (run on a side thread, it blocks in the receiving broadcasts) while
    this rank broadcasts the bucket's tensors one by one.
    """

    def __init__(self, llm: Any, timeout_s: float, master_address: str = "127.0.0.1"):
        self.llm = llm
        self.timeout_s = timeout_s
        self.master_address = master_address
        self.group = None

    def _ensure_group(self, runner: StageRunner) -> None:
        if self.group is not None:
            return
        from vllm.distributed.weight_transfer.nccl_common import trainer_init as open_trainer_endpoint

        workers = int(self.llm.llm_engine.vllm_config.parallel_config.world_size)
        info = {"master_address": self.master_address, "master_port": _free_port(), "world_size": workers + 1}
        worker_info = {**info, "rank_offset": 1, "packed": False}
        side = ThreadPoolExecutor(max_workers=1)
        try:
            fut = side.submit(self.llm.init_weight_transfer_engine, {"init_info": worker_info})
            self.group = runner.run("nccl init", lambda: open_trainer_endpoint(info))
            runner.run("nccl init (engine side)", lambda: fut.result())
        finally:
            side.shutdown(wait=False)

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int,
             dtype: Optional[torch.dtype] = None) -> SyncStats:
        """Broadcast HF-named CUDA tensors to the engine in buckets; returns the stats."""
        stats = SyncStats(transport="nccl")
        t_start = time.perf_counter()
        runner = StageRunner(self.timeout_s, "weight sync (nccl)")
        side = ThreadPoolExecutor(max_workers=1)
        began = finished = False
        try:
            self._ensure_group(runner)
            runner.run("begin", self.llm.start_weight_update)
            began = True
            buckets = iter_buckets(named_tensors, bucket_bytes, dtype)
            k = 0
            while True:
                bucket = runner.run(f"gather bucket {k}", lambda: _next_bucket(buckets))
                if bucket is None:
                    break
                update_info = {
                    "names": [n for n, _ in bucket],
                    "dtype_names": [str(t.dtype).split(".")[-1] for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket],
                }
                recv = side.submit(self.llm.update_weights, {"update_info": update_info})

                def send(b=bucket) -> None:
                    stream = torch.cuda.current_stream()
                    for _, t in b:  # NCCL sends numel elements from data_ptr: contiguous CUDA memory only
                        self.group.broadcast(t.to("cuda", non_blocking=True).contiguous(), src=0, stream=stream)
                    stream.synchronize()

                runner.run(f"broadcast bucket {k}", send)
                runner.run(f"load bucket {k}", lambda: recv.result())
                stats.num_tensors += len(bucket)
                stats.num_bytes += bucket_nbytes(bucket)
                stats.num_buckets += 1
                k += 1
            runner.run("finish", self.llm.finish_weight_update)
            finished = True
        finally:
            if began and not finished and not runner.timed_out:
                try:
                    runner.run("finish after failure", self.llm.finish_weight_update)
                except Exception:  # noqa: BLE001
                    pass
            side.shutdown(wait=False)
            runner.close()
        stats.stage_seconds = runner.stage_seconds
        stats.seconds = time.perf_counter() - t_start
        return stats

    def close(self) -> None:
        """Destroy the NCCL group."""
        if self.group is not None:
            try:
                self.llm.shutdown_weight_transfer_engine()
            finally:
                self.group.destroy()
                self.group = None


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of an HF transformers model, skipping the tied lm_head (vLLM ties it)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor

