"""Errors raised by checkpoint conversion; every message names the file, tensor or directory at fault."""

from __future__ import annotations


class ConversionError(Exception):
    """Base class: a checkpoint cannot be converted as asked."""


class CorruptShardError(ConversionError):
    """A safetensors shard is truncated or has an unreadable header."""


class MissingTensorError(ConversionError):
    """A tensor the architecture needs is absent from the checkpoint."""


class ShapeMismatchError(ConversionError):
    """A tensor has a different shape than the architecture needs."""


class OutputExistsError(ConversionError):
    """The output directory exists and --force was not given."""
