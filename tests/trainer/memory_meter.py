"""Peak bytes of the tensors autograd keeps for backward (activations), measured with saved-tensor hooks.

Every tensor saved for backward during forward passes `pack`; it is counted once per storage (views share
one), parameters and their views are left out (they are the weights, planned separately), and its bytes are
released when autograd drops the saved value (after the backward of its node). The peak over a whole
forward/backward schedule is the activation memory the memory plan estimates, with the micro-batches the
pipeline schedule keeps in flight included.
"""

from __future__ import annotations

import contextlib
import weakref

import torch


class _Saved:
    """What autograd holds instead of the tensor, so its release is seen."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMeter:
    """Counts live saved-for-backward bytes (deduplicated by storage) and their peak."""

    def __init__(self, params):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage ptr -> [refs, bytes]
        self.current = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.param_storages or ptr == 0:
            return tensor
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [0, storage.nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        box = _Saved(tensor)
        weakref.finalize(box, self._release, ptr)
        return box

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[ptr]

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    @contextlib.contextmanager
    def measure(self):
        """Count inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self
