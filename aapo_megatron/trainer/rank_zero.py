"""Run a function on one rank and give every rank its outcome: the return value, or the same exception.

    batch = on_rank0(lambda: collector.collect(prompts, step), group)    # every rank: rank 0's batch
    on_rank0(start_engines, group, share=False)                          # every rank raises if rank 0 failed

Rank 0 owns the rollout side (engines, rewards, data); without this, a failure there would leave the other
ranks waiting at their next collective until its timeout. The exception is re-raised on rank 0 as itself (with
its traceback) and on the others as its unpickled copy, or as `RankZeroError` with the same message and exit
code when it cannot be pickled.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

from aapo_megatron.errors import AapoError

T = TypeVar("T")


class RankZeroError(AapoError):
    """An exception raised on the source rank that could not be sent as itself: its type name and message."""

    def __init__(self, message: str, exit_code: int = AapoError.exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return type(self), (str(self), self.exit_code)


def broadcast_object(obj: Any, group: Optional[dist.ProcessGroup], src: int = 0) -> Any:
    """`obj` of global rank `src` on every rank of `group` (pickled; no-op when alone)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _sendable(exc: Exception) -> Exception:
    """`exc` itself if it survives a pickle round trip, else a RankZeroError carrying its text and exit code."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to pickle or rebuild it
        return RankZeroError(f"{type(exc).__name__}: {exc}", getattr(exc, "exit_code", AapoError.exit_code))


def on_rank0(fn: Callable[[], T], group: Optional[dist.ProcessGroup], *, share: bool = True,
             others: Optional[Callable[[], Any]] = None, src: int = 0) -> Optional[T]:
    """Collective over `group`: fn() on global rank `src` (`others()`, if given, on the other ranks, for their
    part of collectives fn takes part in), then rank `src`'s outcome on every rank: its return value (None
    elsewhere with share=False) or its exception, raised on every rank."""
    is_src = not dist.is_initialized() or dist.get_rank() == src
    value: Any = None
    error: Optional[Exception] = None
    try:
        if is_src:
            value = fn()
        elif others is not None:
            others()
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it (another rank's own raises after)
        error = exc
    sent = (_sendable(error) if error is not None else None, value if share else None) if is_src else None
    outcome = broadcast_object(sent, group, src)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise outcome[0]
    return value if is_src else outcome[1]
