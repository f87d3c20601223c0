"""The policy's weights leaving the trainer: an HF directory on disk, or a stream to the policy engine.

Both are collectives over the data-parallel rank 0 of every model-parallel group (the TP/PP gathers of
`models.weights.iter_hf_tensors`); rank 0 writes the files or feeds the engine.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aapo_megatron.checkpoint.hf_writer import SafetensorsShardWriter, finalize_shards, write_config
from aapo_megatron.models.arch import ArchSpec, to_hf_config
from aapo_megatron.models.weights import iter_hf_tensors
from aapo_megatron.trainer import timeshare
from aapo_megatron.trainer.errors import EngineFailure
from aapo_megatron.trainer.rank_zero import on_rank0

EXPORT_SHARD_BYTES = 2 * 1024**3  # HF export shard size


def iter_hf(model: torch.nn.Module, mapping: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs of the policy, gathered over TP and PP (collective on the gathering ranks)."""
    return iter_hf_tensors(model, mapping, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group())


def export_hf(out_dir: str, model: torch.nn.Module, mapping: Any, spec: ArchSpec, tokenizer: Any, *,
              gathers: bool, group: Optional[dist.ProcessGroup]) -> None:
    """Collective: write the policy as an HF directory (safetensors + config.json + tokenizer), atomically.

    `gathers`: this rank takes part in the weight gathers (data-parallel rank 0)."""
    is_rank0 = dist.get_rank() == 0
    tmp = out_dir + ".tmp"
    writer = None
    if is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        writer = SafetensorsShardWriter(tmp, max_shard_bytes=EXPORT_SHARD_BYTES)
    if gathers:
        for name, tensor in iter_hf(model, mapping):
            if writer is not None:
                writer.add(name, tensor.detach().to("cpu").clone())
    if is_rank0:
        finalize_shards(tmp, writer.close())
        write_config(tmp, to_hf_config(spec))
        tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier(group)


def sync_to_engine(engine: Any, model: torch.nn.Module, mapping: Any, chunks: Optional[list], *, gathers: bool,
                   group: Optional[dist.ProcessGroup]) -> None:
    """Collective: stream the current weights into the policy `engine` (rank 0's; None elsewhere), time-shared
    with Megatron's buffers; an engine failure is an EngineFailure on every rank (the stream is always drained,
    so the TP/PP gathers stay aligned across ranks)."""
    timeshare.before_sync(engine, chunks)

    def drain() -> None:
        if gathers:
            for _ in iter_hf(model, mapping):  # take part in the gathers
                pass

    def feed() -> None:
        tensors = iter_hf(model, mapping)
        error = None
        try:
            engine.update_weights(tensors)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then the restart policy decides
            error = exc
        for _ in tensors:  # take part in the remaining gathers
            pass
        if error is not None:
            raise EngineFailure("policy", error) from error

    on_rank0(feed, group, share=False, others=drain)
    timeshare.after_sync(engine)
    dist.barrier(group)
