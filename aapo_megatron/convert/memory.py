"""Accounting of the converted tensors a worker holds at once, and a lean import of Megatron for conversion workers.

`LiveTensorBytes` counts the bytes of tensors a converter produced that are still alive (each is tracked
until garbage-collected), and their peak. The streamed conversions report that peak, and a test checks it
stays at a few tensors instead of the whole stage.

`import_megatron_without_compile()` is the first import of Megatron-Core in a conversion worker.
Megatron decorates its fused elementwise functions with `torch.compile` at import time
(`megatron.core.jit.jit_fuser`, used by e.g. `transformer/torch_norm.py`, `transformer/attention.py`,
`fusions/fused_bias_swiglu.py`), and the first `torch.compile` call imports torch._dynamo and
torch._inductor: about 70 MiB of RSS per worker. A converter never runs a forward pass, so these
functions are never called. During that import `torch.compile` is the identity, so they stay plain
eager functions (the same math) and `megatron.core.jit.jit_fuser` stays the identity for Megatron
modules imported later in the process; `torch.compile` itself is restored right after. Call it only in
processes that never run the model (the conversion workers, which are spawned for the conversion alone).
"""

from __future__ import annotations

import weakref

import torch


class LiveTensorBytes:
    """Bytes of tracked tensors that are still alive, and the peak of that number."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.count = 0

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count `tensor` (its storage bytes) until it is garbage-collected; returns it."""
        nbytes = tensor.untyped_storage().nbytes()
        self.live += nbytes
        self.count += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


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
