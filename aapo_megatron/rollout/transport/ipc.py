"""`ipc`: vLLM's own `ipc` weight-transfer engine (CUDA IPC handles), for engines on the trainer's own GPUs.

A thin adapter over `stream_buckets`: per bucket, the trainer makes one IPC handle per tensor and sends the
handles through vLLM's `update_weights`; the engine's worker opens them on the same GPU and copies the weights
in (vLLM's `IPCWeightTransferEngine`, unpacked). The bucket's tensors stay referenced until that load returned.
GPU only; on CPU, `shm` covers the same path (same host, same driver).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from aapo_megatron.rollout.transport.base import (
    Bucket,
    BucketSink,
    NamedTensors,
    SyncStats,
    WeightTransport,
    stream_buckets,
    update_info,
)


class IpcTransport(WeightTransport):
    """Trainer side of `ipc` for an in-process `vllm.LLM` or any vLLM weight-sync client."""

    name = "ipc"

    def __init__(self, client: Any):
        """client: `llm_client.LLMClient` or a `VLLMWeightSyncClient`."""
        self.client = client
        self.initialized = False

    @classmethod
    def engine_kwargs(cls) -> dict[str, Any]:
        """`vllm.LLM(weight_transfer_config=...)` for vLLM's ipc engine."""
        return {"weight_transfer_config": {"backend": "ipc"}}

    def _handles(self, bucket: Bucket, k: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
        from torch.multiprocessing.reductions import reduce_tensor

        device = torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        keep = [t.detach().to(f"cuda:{device}").contiguous() for _, t in bucket]
        info = update_info(bucket)
        info["ipc_handles"] = [{uuid: reduce_tensor(t)[1]} for t in keep]
        torch.cuda.current_stream().synchronize()  # the copies exist before the engine opens them
        return info, keep

    def sync(self, named_tensors: NamedTensors, *, bucket_bytes: int, timeout_s: float,
             dtype: Optional[torch.dtype] = None, on_begin: Optional[Callable[[], None]] = None) -> SyncStats:
        """Send each bucket as CUDA IPC handles; returns the stats."""
        if not self.initialized:
            self.client.init_weight_transfer_engine({"packed": False})
            self.initialized = True
        sink = BucketSink(begin=self.client.start_weight_update, write=self._handles,
                          load=lambda payload: self.client.update_weights(payload[0]),
                          finish=self.client.finish_weight_update, abort=self.client.finish_weight_update,
                          release=lambda payload: torch.cuda.ipc_collect())
        return stream_buckets(sink, named_tensors, transport=self.name, bucket_bytes=bucket_bytes,
                              timeout_s=timeout_s, dtype=dtype, on_begin=on_begin)
