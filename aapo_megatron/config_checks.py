"""Up-front checks of a loaded config that look beyond single fields: non-finite numbers anywhere, reward names
against the reward registry, server placement with an SFT warm start, and prompt files on disk.

`config.validate` calls `check_finite` and `check_upfront`, the eval config's validation `check_finite` and
`check_reward_names`; `aapo-train` calls `check_input_files` right after loading the config (validation itself
stays independent of the machine, so that configs naming data on a cluster filesystem load anywhere). Either way a mistake exits 2 before any
tokenizer, model, SFT step, engine or data loading starts. Each raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from aapo_megatron.config import ConfigError


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


def check_reward_names(functions: Mapping[str, float], key: str = "reward.functions") -> None:
    """ConfigError unless every name is a registered reward function or an importable "pkg.module:fn"."""
    from aapo_megatron.rewards.registry import RewardError, resolve_reward

    for name in functions:
        try:
            resolve_reward(name)
        except RewardError as exc:
            raise ConfigError(f"'{key}.{name}': {exc}") from None


def check_server_with_sft(cfg: Any) -> None:
    """ConfigError for rollout.placement=server with an SFT warm start when the algorithm samples the reference:
    the reference server serves the model it was started with, which cannot be this run's warm start."""
    a, t = cfg.algorithm, cfg.trainer
    if cfg.rollout.placement != "server" or t.sft_steps == 0 or a.name == "sft":
        return
    from aapo_megatron.algorithms.advantages import ADVANTAGE_ESTIMATORS

    if ADVANTAGE_ESTIMATORS.get(a.name).uses_reference:
        raise ConfigError(
            f"'trainer.sft_steps' must be 0 with rollout.placement=server and algorithm.name={a.name} (it samples "
            f"the reference), got {t.sft_steps}: the reference server serves the model it was started with, not "
            f"this run's SFT warm start. Run the SFT first (algorithm.name=sft), serve its hf_final as the "
            f"reference and start RL from it (model.path)")


def check_upfront(cfg: Any) -> None:
    """The checks of a training Config that need the registries (`cfg` is a Config)."""
    if cfg.algorithm.name != "sft":
        check_reward_names(cfg.reward.functions)
        from aapo_megatron.algorithms.temperature import logprob_temperature

        logprob_temperature(cfg)  # sampling with greedy rollouts (rollout.temperature 0) is refused
    check_server_with_sft(cfg)


def check_input_files(cfg: Any) -> None:
    """ConfigError unless `data.train_path` / `data.eval_path` (file sources) exist and can be opened (and a
    *.gz one is gzip data); `cfg` is a Config."""
    data = cfg.data
    if data.source not in ("jsonl", "parquet"):
        return
    from aapo_megatron.data.readers import DataError, check_readable

    for name in ("train_path", "eval_path"):
        path = getattr(data, name)
        if path is None:
            continue
        try:
            check_readable(path)
        except DataError as exc:
            raise ConfigError(f"'data.{name}': {exc}") from None
