"""Errors of the on-disk checkpoint formats; every message names the file, tensor or directory at fault."""

from __future__ import annotations

from aapo_megatron.errors import EXIT_SAVE_FAILED, AapoError


class CheckpointError(AapoError):
    """A trainer checkpoint is missing, partial or corrupt."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permission denied, ...); the previous one is kept (exit 4)."""

    exit_code = EXIT_SAVE_FAILED


class ConversionError(AapoError):
    """A checkpoint cannot be read, written or converted as asked (aapo-convert reports it with exit code 1)."""


class CorruptShardError(ConversionError):
    """A safetensors shard is truncated or has an unreadable header."""


class MissingTensorError(ConversionError):
    """A tensor the architecture needs is absent from the checkpoint."""


class ShapeMismatchError(ConversionError):
    """A tensor has a different shape than the architecture needs."""
