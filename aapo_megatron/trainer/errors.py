"""The trainer's own errors (both derive from the project's root, `aapo_megatron.errors.AapoError`)."""

from __future__ import annotations

from aapo_megatron.errors import AapoError


class TrainingError(AapoError):
    """The run cannot continue (the message says why and what to do); exit 1."""


class EngineFailure(AapoError):
    """A rollout engine failed while generating or taking weights (its process died, it refused, it timed out)."""

    def __init__(self, role: str, cause: object):
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"{role} rollout engine failed: {text}")
        self.role = role
        self.text = text

    def __reduce__(self):  # picklable, so rank 0 can send it to every rank (rank_zero.on_rank0)
        return type(self), (self.role, self.text)
