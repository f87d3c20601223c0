"""Field-level checks of a loaded config: ranges, finiteness and the sampling ranges shared by training and eval.

Each raises `ConfigError` naming the key ("'section.name' must be > 0, got -1"). They look at values only, never
at a registry, so any config class (the training `Config`, aapo-eval's `EvalConfig`) can use them; the checks
against the registries are `aapo_megatron.validation`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from aapo_megatron.config.loader import ConfigError


def check(cond: bool, key: str, msg: str, value: Any) -> None:
    """ConfigError "'key' msg, got value" unless `cond`."""
    if not cond:
        raise ConfigError(f"'{key}' {msg}, got {value!r}")


def positive(cfg: Any, section: str, *names: str) -> None:
    """Each named field of `cfg` must be > 0 (keys reported as section.name)."""
    for name in names:
        v = getattr(cfg, name)
        check(v > 0, f"{section}.{name}", "must be > 0", v)


def non_negative(cfg: Any, section: str, *names: str) -> None:
    """Each named field of `cfg` must be >= 0 (keys reported as section.name)."""
    for name in names:
        v = getattr(cfg, name)
        check(v >= 0, f"{section}.{name}", "must be >= 0", v)


def check_sampling(section: str, *, temperature: Optional[float], top_p: float, top_k: int,
                   max_new_tokens: int) -> None:
    """The sampling ranges shared by training rollouts and aapo-eval: temperature >= 0 (None = a default),
    top_p in (0, 1], top_k -1 or > 0, max_new_tokens (tokens) >= 1; keys reported as section.name."""
    check(temperature is None or temperature >= 0, f"{section}.temperature", "must be >= 0", temperature)
    check(0 < top_p <= 1, f"{section}.top_p", "must be in (0, 1]", top_p)
    check(top_k == -1 or top_k > 0, f"{section}.top_k", "must be -1 (off) or > 0", top_k)
    check(max_new_tokens >= 1, f"{section}.max_new_tokens", "must be >= 1", max_new_tokens)


def check_finite(value: Any, key: str = "") -> None:
    """ConfigError naming the first float that is inf or NaN anywhere in `value` (dataclass, mapping, list)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
