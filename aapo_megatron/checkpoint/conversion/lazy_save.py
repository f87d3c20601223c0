"""Save a GPTModel as a Megatron dist_checkpointing (torch_dist) checkpoint whose tensor data is produced on demand.

The converter builds a pipeline stage's GPTModel only for its `sharded_state_dict()` (keys, global
shapes, offsets, replica ids: what makes the checkpoint loadable at any TP/PP). Its parameters are
allocated but never written, so their pages are never touched and cost no RSS. The save goes through
Megatron's own `dist_checkpointing.save` (common.pt, metadata.json, sharding validation) with a
torch_dist strategy whose DCP planner builds each tensor only when the file writer asks for it:

    produce(local_param_name, first_row, end_row) -> rows [first_row, end_row) of that parameter's value

(a Megatron tensor may be saved in pieces: linear_fc1 is saved as its gate and up halves). The writer is
torch's synchronous `FileSystemWriter` with one thread, which resolves and writes one tensor at a time;
the planner frees each produced tensor's storage when the writer asks for the next one, so a worker
holds about one tensor at once instead of its whole stage. The checkpoint holds what
`save_mcore_checkpoint` would write: the same keys, global shapes, chunks and tensor values (one
.distcp file per rank).

Import this module only after Megatron-Core is imported (see `checkpoint.conversion.memory.import_megatron_without_compile`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from aapo_megatron.checkpoint.conversion.memory import LiveTensorBytes

Produce = Callable[[str, int, int], torch.Tensor]
"""(local parameter name, first row, end row) -> those rows of the parameter's value, shape [end - first, ...]."""


class _LazySavePlanner(MCoreSavePlanner):
    """Megatron's save planner, except that a parameter's data comes from `produce` when the writer resolves it."""

    def __init__(self, params: dict[int, tuple[str, torch.Tensor]], produce: Produce, tracker: LiveTensorBytes):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._params = params  # storage address -> (local name, parameter)
        self._produce = produce
        self._tracker = tracker
        self._last: Optional[torch.Tensor] = None

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self.release_last()
        placeholder = self.lookup_object(write_item.index)  # a view of the (never written) parameter
        entry = self._params.get(placeholder.untyped_storage().data_ptr())
        if entry is None:
            return super().resolve_data(write_item)  # not a parameter (a buffer): its real data
        name, param = entry
        row = param.numel() // param.shape[0] if param.dim() > 1 else 1  # elements per row
        first, rem = divmod(placeholder.storage_offset() - param.storage_offset(), row)
        rows, rem2 = divmod(placeholder.numel(), row)
        if rem or rem2:
            raise RuntimeError(f"checkpoint chunk {write_item.index.fqn} at {list(write_item.index.offset)} does not "
                               f"cover whole rows of parameter {name!r}")
        value = self._produce(name, first, first + rows)
        expected = (rows, *param.shape[1:])
        if tuple(value.shape) != expected:
            raise RuntimeError(f"produced rows [{first}, {first + rows}) of {name!r} with shape "
                               f"{tuple(value.shape)}, expected {expected}")
        value = value.to(placeholder.dtype).reshape(placeholder.shape)
        if value.untyped_storage().nbytes() != value.nbytes:
            value = value.clone()  # own storage, so that the writer does not clone it (and release_last frees it)
        self._last = self._tracker.track(value)
        return value

    def release_last(self) -> None:
        """Free the storage of the tensor produced last (it was written: the writer resolves items one by one).

        torch's `_write_files_from_queue` keeps a reference to the last tensor written under each key until its
        file is complete (it collects them for its safetensors format): the embedding, the output layer and one
        tensor of each stacked layer key would stay allocated.
        """
        if self._last is not None:
            self._last.untyped_storage().resize_(0)
            self._last = None


class _LazyTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save (same backend and version, so Megatron loads it as usual) through `_LazySavePlanner`."""

    def __init__(self, planner: _LazySavePlanner):
        super().__init__("torch_dist", 1)
        self._planner = planner

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        import torch.distributed.checkpoint as dcp

        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        # one thread, no copy-ahead: the serial loader resolves an item only after the previous one was written,
        # which `release_last` relies on (with a GPU visible, copy-ahead would resolve several in advance)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                  per_thread_copy_ahead=0)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=self._planner)
        self._planner.release_last()


def save_mcore_checkpoint_lazy(model: torch.nn.Module, ckpt_dir: str, produce: Produce,
                               tracker: Optional[LiveTensorBytes] = None) -> LiveTensorBytes:
    """Save this rank's `model` (torch_dist) with every parameter's data from `produce`; collective over all ranks.

    The parameters' own contents are never read. Returns the tracker of produced bytes (its `peak`: the most
    bytes of produced tensors alive at once).
    """
    from megatron.core import dist_checkpointing

    from aapo_megatron.models.weights import unwrap_model

    model = unwrap_model(model)
    tracker = tracker or LiveTensorBytes()
    params = {p.untyped_storage().data_ptr(): (n, p) for n, p in model.named_parameters()}
    os.makedirs(ckpt_dir, exist_ok=True)
    strategy = _LazyTorchDistSaveStrategy(_LazySavePlanner(params, produce, tracker))
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir, sharded_strategy=strategy)
    return tracker
