"""`gloo`: the CPU twin of `nccl`, for engines on other CPU hosts (and the cross-node path's test on CPU).

Trainer side: `BroadcastTransport` with a gloo group in place of NCCL. Engine side: `GlooWeightTransferEngine`,
a custom vLLM weight-transfer engine registered with vLLM's `WeightTransferEngineFactory` under "gloo" (by our
vLLM plugin, in every vLLM process), so the sync goes through vLLM's own init/start/update/finish protocol,
in-process (`LLMClient`) or through a rollout server's update session (`http_session.HttpSyncClient`). It
takes vLLM's NCCL init and update infos unchanged and mirrors vLLM's NCCL engine, except that the group is
gloo, there is no device sync, the buckets are staged until finish, which refuses an update missing a tensor
of the served checkpoint (the old weights stay served), and the reload is the CPU-safe `ReloadSession`
(vLLM-CPU repacks linear weights at load time). Across hosts the peers must resolve each other's hostnames to
reachable addresses (or set GLOO_SOCKET_IFNAME to the interface they reach).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch

from aapo_megatron.errors import AapoError
from aapo_megatron.rollout.transport.broadcast import BroadcastTransport

BACKEND = "gloo"
"""The name the engine side registers under in vLLM's WeightTransferEngineFactory."""

GROUP_TIMEOUT = timedelta(minutes=10)
"""A gloo collective that waits longer than this fails (our stage timeouts fire first)."""


class GlooGroup:
    """A stateless gloo process group with the surface of vLLM's PyNcclCommunicator: broadcast, destroy."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int):
        """Join the group (rank 0 serves the rendezvous store at master_address:master_port)."""
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.rank = rank
        self.pg = stateless_init_torch_distributed_process_group(master_address, master_port, rank, world_size,
                                                                 backend="gloo", timeout=GROUP_TIMEOUT)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream: Any = None) -> None:
        """Broadcast a contiguous CPU tensor in place from group rank `src` (stream: unused, for NCCL's API)."""
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        """Leave the group."""
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        pg, self.pg = self.pg, None
        if pg is not None:
            stateless_destroy_torch_distributed_process_group(pg)


class GlooTransport(BroadcastTransport):
    """Trainer side of `gloo`: rank 0 of a gloo group with the engine's workers."""

    name = "gloo"
    backend = BACKEND

    def open_group(self, master_address: str, master_port: int, world_size: int) -> GlooGroup:
        """Rank 0 of the gloo group."""
        return GlooGroup(master_address, master_port, 0, world_size)

    def to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU copy-or-view."""
        return tensor.detach().to("cpu").contiguous()


def worker_rank(parallel_config: Any, rank_offset: int) -> int:
    """This worker's rank in the trainer+workers group: unique across DP replicas, after the trainer's ranks."""
    return (parallel_config.data_parallel_index * parallel_config.world_size + parallel_config.rank
            + rank_offset)


class IncompleteUpdate(AapoError):
    """A weight update that did not deliver every tensor of the served checkpoint; nothing was loaded."""


def _engine_class() -> type:
    """GlooWeightTransferEngine, built on first use (vLLM is imported only in processes that need it)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
    )

    from aapo_megatron.rollout.update_session import describe_missing, required_tensor_names
    from aapo_megatron.rollout.worker_extension import ReloadSession

    class GlooWeightTransferEngine(WeightTransferEngine[NCCLWeightTransferInitInfo, NCCLWeightTransferUpdateInfo]):
        """Engine side of `gloo`: receives every bucket by gloo broadcast into staging buffers, and at finish
        loads them in one reload only if they hold every tensor of the served checkpoint (else rejects the
        update: the old weights stay served). Staging holds one copy of the weights in host memory."""

        init_info_cls = NCCLWeightTransferInitInfo
        update_info_cls = NCCLWeightTransferUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group: GlooGroup | None = None
            self.session = ReloadSession()
            self.staged: list[tuple[str, torch.Tensor]] = []
            self.staged_names: set[str] = set()
            self.expected = required_tensor_names(vllm_config.model_config.model)
            self.last_finish: dict[str, Any] = {}

        def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
            """Join the trainer's gloo group (a new init replaces the old group)."""
            if init_info.packed:
                raise ValueError("gloo weight transfer: packed=True is not supported; send packed=False")
            self.shutdown()
            self.group = GlooGroup(init_info.master_address, init_info.master_port,
                                   worker_rank(self.parallel_config, init_info.rank_offset), init_info.world_size)

        def start_weight_update(self) -> None:
            """Begin an update: empty staging (the model is untouched until finish)."""
            self.discard()

        def update_weights(self, update_info: dict[str, Any]) -> None:
            """Receive one bucket into staging (no device sync: gloo is synchronous)."""
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
            """Receive the bucket's tensors in order into staging buffers."""
            if self.group is None:
                raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
            for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
                weight = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
                self.group.broadcast(weight, src=0)
                if name in self.staged_names:
                    raise ValueError(f"gloo weight transfer: tensor {name!r} delivered twice in one update")
                self.staged.append((name, weight))
                self.staged_names.add(name)

        def finish_weight_update(self) -> None:
            """Load the staged tensors in one reload (repacks CPU GEMMs, re-ties shared weights); raises
            IncompleteUpdate, loading nothing, when they miss a tensor of the served checkpoint."""
            try:
                missing = sorted(self.expected - self.staged_names) if self.expected else []
                if missing:
                    raise IncompleteUpdate(f"{describe_missing(missing, len(self.expected))}: update rejected, "
                                           f"the served weights are unchanged")
                self.session.begin(self.model)
                self.session.load(self.model, self.staged)
                self.last_finish = self.session.finish(self.model, self.model_config)
            finally:
                self.discard()

        def discard(self) -> None:
            """Drop the staged tensors (an aborted or finished update)."""
            self.staged, self.staged_names = [], set()

        def shutdown(self) -> None:
            """Leave the gloo group."""
            if self.group is not None:
                self.group.destroy()
                self.group = None

    return GlooWeightTransferEngine


_ENGINE_CLASS: list[type] = []


def __getattr__(name: str) -> Any:
    """`GlooWeightTransferEngine` is built on first access (what vLLM's lazy factory loader does)."""
    if name == "GlooWeightTransferEngine":
        if not _ENGINE_CLASS:
            _ENGINE_CLASS.append(_engine_class())
        return _ENGINE_CLASS[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_gloo_engine() -> bool:
    """Register "gloo" with vLLM's WeightTransferEngineFactory (idempotent); False when vLLM lacks the factory."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:
        return False
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    except ValueError:  # "already registered": this process ran it before
        pass
    return True
