"""The weight-transport interface and the ONE bucketed, pipelined driver every transport uses.

A transport (`WeightTransport`) moves HF-named tensors from the trainer's sender rank into a vLLM policy engine.
Each implements only its data plane as a `BucketSink`: how a bucket is staged on the trainer's side (`write`,
run on the gather thread) and how the engine receives it (`load`, run on the engine thread). `stream_buckets`
owns the rest for all of them: grouping into buckets, overlapping the gather of bucket k+1 with the load of
bucket k (at most two buckets in flight), a timeout on every stage naming it (`WeightSyncTimeout`), and the
abort after a failure.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from aapo_megatron.distributed import current_platform

NamedTensors = Iterable[tuple[str, torch.Tensor]]
Bucket = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the stage."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A weight sync stage did not finish within the timeout."""


@dataclass
class SyncStats:
    """What one weight sync moved and how long each stage took."""

    transport: str
    """The transport's registry name (`transport.TRANSPORTS`)."""
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
        platform = current_platform()
        device = torch.cuda.current_device() if platform.cuda else None

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


@dataclass
class BucketSink:
    """One transport's data plane for `stream_buckets`: begin, write+load per bucket, finish, abort."""

    begin: Callable[[], Any]
    """Open the engine's update session (engine thread)."""
    write: Callable[[Bucket, int], Any]
    """write(bucket, k) -> payload: stage bucket k on the trainer's side (gather thread)."""
    load: Callable[[Any], Any]
    """load(payload): the engine receives and loads one bucket (engine thread)."""
    finish: Callable[[], Any]
    """Close the session once every bucket loaded (engine thread)."""
    abort: Callable[[], Any]
    """Close the session after a failure (engine thread; skipped when the engine itself hung)."""
    release: Optional[Callable[[Any], None]] = None
    """release(payload) after its load returned (e.g. delete a bucket file)."""
    cleanup: Optional[Callable[[], None]] = None
    """Called last, also on failure, once no stage of this sync runs any more."""


def stream_buckets(sink: BucketSink, named_tensors: NamedTensors, *, transport: str, bucket_bytes: int,
                   timeout_s: float, dtype: Optional[torch.dtype] = None,
                   on_begin: Optional[Callable[[], None]] = None) -> SyncStats:
    """Stream HF-named tensors through `sink` in buckets of <= bucket_bytes bytes; returns the stats.

    Bucket k+1 is gathered and written while the sink loads bucket k, so at most two buckets exist at once. A
    failure after `begin` calls `sink.abort` (unless the engine hung) and re-raises; the receiver may then hold
    a mix of old and new weights. `on_begin` runs right after `begin` succeeded.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"weight sync bucket size must be > 0 bytes, got {bucket_bytes}")
    stats = SyncStats(transport=transport)
    t_start = time.perf_counter()
    gather = StageRunner(timeout_s, "weight sync")   # gathers + writes buckets
    engine = StageRunner(timeout_s, "weight sync")   # drives the receiver
    began = finished = False
    try:
        buckets = iter_buckets(named_tensors, bucket_bytes, dtype)
        engine.run("begin", sink.begin)
        began = True
        if on_begin is not None:
            on_begin()

        def produce(k: int) -> Optional[tuple[Any, int, int]]:
            bucket = next(buckets, None)
            if bucket is None:
                return None
            return sink.write(bucket, k), len(bucket), bucket_nbytes(bucket)

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
            if sink.release is not None:
                sink.release(payload)
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
        # A failed load leaves the next bucket's write running: let it end before the sink cleans up.
        gather.close(wait_s=gather.timeout_s)
        engine.close()
        if sink.cleanup is not None:
            sink.cleanup()
    stats.stage_seconds = {**gather.stage_seconds, **engine.stage_seconds}
    stats.seconds = time.perf_counter() - t_start
    return stats


class WeightTransport(abc.ABC):
    """Trainer side of one way of moving weights into a vLLM policy engine; `sync` is called once per step."""

    name: str = ""
    """The registry name (`transport.TRANSPORTS`)."""

    @abc.abstractmethod
    def sync(self, named_tensors: NamedTensors, *, bucket_bytes: int, timeout_s: float,
             dtype: Optional[torch.dtype] = None, on_begin: Optional[Callable[[], None]] = None) -> SyncStats:
        """Send every HF-named tensor to the engine in buckets (via `stream_buckets`); returns the stats."""

    @classmethod
    def for_engine(cls, llm: Any, shm_dir: Optional[str] = None) -> "WeightTransport":
        """The trainer side for an in-process `vllm.LLM` (a colocated engine): by default `cls(client)` over
        vLLM's weight-transfer API (`llm_client.LLMClient`); `shm_dir` is for transports that use files."""
        from aapo_megatron.rollout.transport.llm_client import LLMClient

        return cls(LLMClient(llm))

    @classmethod
    def engine_kwargs(cls) -> dict[str, Any]:
        """Extra `vllm.LLM(...)` arguments this transport needs on the receiving side."""
        return {}

    def close(self) -> None:
        """Release the transport's groups, files and threads."""


def update_info(bucket: Bucket) -> dict[str, list]:
    """vLLM's per-bucket update metadata {names, dtype_names, shapes} (NCCL/IPC/gloo update info)."""
    return {"names": [n for n, _ in bucket], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of an HF transformers model, skipping the tied lm_head (vLLM ties it)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor

