"""GPU only: give Megatron's gradient buffers and cached blocks back while colocated vLLM engines hold the GPU.

A thin adapter over Megatron-Core's own `DistributedDataParallel.offload_grad_buffers` /
`restore_grad_buffers` and `torch.cuda.empty_cache`. Activations are already freed after each backward; the
caching allocator keeps their blocks until `empty_cache`. On CPU both calls do nothing (there is no device
memory to share; `trainer/timeshare.py` runs the same order there).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from aapo_megatron.distributed import current_platform


def release_training_memory(chunks: Optional[Iterable[torch.nn.Module]]) -> bool:
    """Free the DDP grad buffers of `chunks` and the allocator's cache; False (no-op) without CUDA."""
    if not current_platform().cuda:
        return False
    for chunk in chunks or ():
        offload = getattr(chunk, "offload_grad_buffers", None)
        if callable(offload):
            offload(synchronize=True, empty_cache=False)
    torch.cuda.empty_cache()
    return True


def restore_training_memory(chunks: Optional[Iterable[torch.nn.Module]]) -> bool:
    """Reallocate (zeroed) the DDP grad buffers of `chunks` before training; False (no-op) without CUDA."""
    if not current_platform().cuda:
        return False
    for chunk in chunks or ():
        restore = getattr(chunk, "restore_grad_buffers", None)
        if callable(restore):
            restore(synchronize=True)
    return True
