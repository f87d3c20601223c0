"""The one table of floating-point dtype names the configs, the CLIs and vLLM take ("auto" decided by the Platform)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtype name (model.dtype, rollout.dtype, `--dtype`) -> torch dtype."""

DTYPE_BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}
"""Dtype name -> bytes per element."""


def dtype_name(name: str, default: str, what: str = "dtype") -> str:
    """`name` checked against DTYPES, with "auto" -> `default` (Platform.default_dtype); ValueError naming `what`."""
    if name == "auto":
        return default
    if name not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}; expected one of auto, {', '.join(DTYPES)}")
    return name
