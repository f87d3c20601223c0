"""Trainer side of the broadcast transports (`gloo`, `nccl`): one group over the sender and the engine's workers.

The two share every line here; each subclass names only its vLLM weight-transfer backend, how rank 0 opens the
group, and how a tensor goes onto the wire. The engine side is a vLLM weight-transfer engine (vLLM's own `nccl`,
our `gloo` twin), driven through vLLM's protocol: `init_weight_transfer_engine` once, then per sync
`start_weight_update`, `update_weights` per bucket (run on a side thread: the workers block in the receiving
broadcasts while this rank sends), `finish_weight_update` (our gloo engine refuses an incomplete update there),
and after a failure `abort_weight_update` where the client has one. The client is `LLMClient` in-process, or
`http_session.HttpSyncClient` for a rollout server (its update session, over HTTP).
"""

from __future__ import annotations

import abc
import socket
from typing import Any, Callable, Optional

import torch

from aapo_megatron.rollout.transport.base import (
    Bucket,
    BucketSink,
    NamedTensors,
    StageRunner,
    SyncStats,
    WeightTransport,
    _DaemonWorker,
    stream_buckets,
    update_info,
)
from aapo_megatron.rollout.transport.llm_client import LLMClient  # noqa: F401  (its clients take one)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BroadcastTransport(WeightTransport):
    """Bucketed broadcast from trainer rank 0 to every engine worker, through `stream_buckets`."""

    backend: str = ""
    """The vLLM weight-transfer backend the engine is built with."""

    def __init__(self, client: Any, *, num_workers: Optional[int] = None, master_address: str = "127.0.0.1",
                 master_port: Optional[int] = None):
        """client: `LLMClient` or any `VLLMWeightSyncClient`; master_address: this host's address as the
        engine's workers reach it (rank 0 serves the rendezvous store there)."""
        self.client = client
        self.num_workers = int(num_workers if num_workers is not None else client.num_workers)
        self.master_address = master_address
        self.master_port = master_port
        self.group: Any = None

    # ---------------------------------------------------------------- the per-backend part

    @abc.abstractmethod
    def open_group(self, master_address: str, master_port: int, world_size: int) -> Any:
        """Join the group as rank 0; returns an object with broadcast(tensor, src, stream) and destroy()."""

    @abc.abstractmethod
    def to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """The contiguous tensor to broadcast, on the group's device."""

    def stream(self) -> Any:
        """The stream broadcasts are enqueued on (None: synchronous)."""
        return None

    # ---------------------------------------------------------------- shared

    @classmethod
    def engine_kwargs(cls) -> dict[str, Any]:
        """`vllm.LLM(weight_transfer_config=...)` naming this backend."""
        return {"weight_transfer_config": {"backend": cls.backend}}

    def _ensure_group(self, timeout_s: float) -> None:
        if self.group is not None:
            return
        port = self.master_port or free_port(self.master_address)
        world = self.num_workers + 1
        worker_info = {"master_address": self.master_address, "master_port": port, "rank_offset": 1,
                       "world_size": world, "packed": False}
        runner = StageRunner(timeout_s, f"weight sync ({self.name})")
        side = _DaemonWorker(f"aapo-{self.name}-init", lambda: None)
        try:  # the workers block in the rendezvous until rank 0 joins: start them first, on a side thread
            joined = side.submit(lambda: self.client.init_weight_transfer_engine(worker_info))
            self.group = runner.run(f"{self.name} init", lambda: self.open_group(self.master_address, port, world))
            runner.run(f"{self.name} init (engine side)", joined.result)
        finally:
            side.shutdown()
            runner.close()

    def _send(self, side: _DaemonWorker, bucket: Bucket) -> None:
        received = side.submit(lambda: self.client.update_weights(update_info(bucket)))
        stream = self.stream()
        for _, t in bucket:
            self.group.broadcast(t, src=0, stream=stream)
        if stream is not None:
            stream.synchronize()
        received.result()

    def sync(self, named_tensors: NamedTensors, *, bucket_bytes: int, timeout_s: float,
             dtype: Optional[torch.dtype] = None, on_begin: Optional[Callable[[], None]] = None) -> SyncStats:
        """Broadcast HF-named tensors to the engine in buckets; returns the stats. After a failure the group is
        closed (a broadcast may be half done) and the next sync opens a new one."""
        self._ensure_group(timeout_s)
        side = _DaemonWorker(f"aapo-{self.name}-rpc", lambda: None)
        sink = BucketSink(begin=self.client.start_weight_update,
                          write=lambda bucket, k: [(n, self.to_wire(t)) for n, t in bucket],
                          load=lambda bucket: self._send(side, bucket),
                          finish=self.client.finish_weight_update,
                          abort=getattr(self.client, "abort_weight_update", self.client.finish_weight_update))
        try:
            return stream_buckets(sink, named_tensors, transport=self.name, bucket_bytes=bucket_bytes,
                                  timeout_s=timeout_s, dtype=dtype, on_begin=on_begin)
        except BaseException:
            self._drop_group()
            raise
        finally:
            side.shutdown()

    def _drop_group(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            try:
                group.destroy()
            except Exception:  # noqa: BLE001 - a broken group may fail to close
                pass

    def close(self) -> None:
        """The workers leave the group, then rank 0 destroys it."""
        if self.group is None:
            return
        try:
            self.client.shutdown_weight_transfer_engine()
        except Exception:  # noqa: BLE001 - the engine may be gone already
            pass
        self._drop_group()
