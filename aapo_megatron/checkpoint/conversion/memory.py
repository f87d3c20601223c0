"""Accounting of the converted tensors a worker holds at once, and a lean import of Megatron for conversion workers.

`current_rss()` is what each worker reports as its baseline: its RSS once its imports and setup are done,
right before it reads the first weight (`ConversionResult.worker_base_rss`).

`LiveTensorBytes` counts the bytes of tensors a converter produced that are still allocated (a storage
counts until it is freed, whoever holds it), and their peak. The streamed conversions report that peak,
and a test checks it stays at a few tensors instead of the whole stage.

`import_megatron_without_compile()` is the first import of Megatron-Core in a conversion worker.
Megatron decorates its fused elementwise functions with `torch.compile` at import time
(`megatron.core.jit.jit_fuser`, used by e.g. `transformer/torch_norm.py`, `transformer/attention.py`,
`fusions/fused_bias_swiglu.py`), and the first `torch.compile` call imports torch._dynamo and
torch._inductor: about 70 MiB of RSS per worker. A converter never runs a forward pass, so these
functions are never called. During that import `torch.compile` is the identity, so they stay plain
eager functions (the same math) and `megatron.core.jit.jit_fuser` stays the identity for Megatron
modules imported later in the process; `torch.compile` itself is restored right after. It is meant for
processes that never run the model (the conversion workers, spawned for the conversion alone); a process
that converts and then runs the model (a test) gets the same results, without the compile speedup.
"""

from __future__ import annotations

import weakref

import torch


class LiveTensorBytes:
    """Bytes still allocated in the storages of tracked tensors, and the peak of that number.

    A storage is counted (once, however many tracked tensors share it) until it is freed or resized to zero;
    torch keeps one Python object per storage, so a weak reference to it says when the memory is gone.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.count = 0
        self._storages: dict[int, weakref.ref] = {}  # id -> storage of a tracked tensor

    @property
    def live(self) -> int:
        """Bytes allocated now in the tracked storages that are still alive."""
        total = 0
        for key, ref in list(self._storages.items()):
            storage = ref()
            if storage is None:
                del self._storages[key]
            else:
                total += storage.nbytes()
        return total

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count `tensor`'s storage from now on (updates the peak); returns `tensor`."""
        storage = tensor.untyped_storage()
        self._storages[id(storage)] = weakref.ref(storage)
        self.count += 1
        self.peak = max(self.peak, self.live)
        return tensor


def current_rss() -> int:
    """Resident set size of this process now, bytes (VmRSS)."""
    import psutil

    return psutil.Process().memory_info().rss


def _eager_compile(model=None, **kwargs):
    """Stand-in for torch.compile: the function itself (used as `@torch.compile` or `@torch.compile(...)`)."""
    if model is None:
        return lambda fn: fn
    return model


def import_megatron_without_compile() -> None:
    """Import Megatron-Core (GPT model, dist_checkpointing) with `torch.compile` as the identity meanwhile.

    See the module docstring. No effect if Megatron-Core is already imported.
    """
    real = torch.compile
    torch.compile = _eager_compile
    try:
        import megatron.core  # noqa: F401  (megatron.core.jit captures jit_fuser = torch.compile here)
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
    finally:
        torch.compile = real
