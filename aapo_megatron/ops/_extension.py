"""Loads the compiled extension `aapo_megatron._C`, which registers the torch.ops.aapo.* operators."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load_extension() -> None:
    """Import aapo_megatron._C once (registers torch.ops.aapo); raise a clear error when it was never built."""
    try:
        import aapo_megatron._C  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "aapo_megatron._C is not built; run `make build` (or `python setup.py build_ext --inplace`)"
        ) from exc
