"""`nccl`: vLLM's own `nccl` weight-transfer engine, for engines on other GPUs or nodes (GPU only).

A thin adapter: everything but opening the group and the wire format is `BroadcastTransport`, shared line for
line with `gloo` (which covers it on CPU). The engine side is vLLM's `NCCLWeightTransferEngine`, unpacked.
Never between two processes on one GPU: NCCL refuses that ("Duplicate GPU detected"); colocated engines use
`ipc` (`registry.check_transport` refuses nccl there at config time).
"""

from __future__ import annotations

from typing import Any

import torch

from aapo_megatron.rollout.transport.broadcast import BroadcastTransport


class NcclTransport(BroadcastTransport):
    """Trainer side of `nccl`: rank 0 of vLLM's stateless NCCL group with the engine's workers."""

    name = "nccl"
    backend = "nccl"

    def open_group(self, master_address: str, master_port: int, world_size: int) -> Any:
        """Rank 0 of vLLM's PyNcclCommunicator on the current CUDA device."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        return trainer_init({"master_address": master_address, "master_port": master_port, "world_size": world_size})

    def to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """Contiguous, on the current CUDA device (NCCL sends numel elements from data_ptr)."""
        return tensor.detach().to("cuda", non_blocking=True).contiguous()

    def stream(self) -> Any:
        """The current CUDA stream."""
        return torch.cuda.current_stream()
