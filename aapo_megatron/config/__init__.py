"""Run configuration: the schema (nested dataclasses with field docstrings), a generic loader (YAML + dotted
overrides, did-you-mean on the schema being loaded) and field-level checks (`checks`: ranges, finiteness).

A low layer: torch-free, importing nothing else of the package but `errors`, so every module can take its
types from here. Validation against the registries is `aapo_megatron.validation`, which also loads a
validated training config:

    from aapo_megatron.validation import load_config
    cfg = load_config("configs/quickstart_cpu.yaml", ["algorithm.delta_high=0.3"])

Errors are `ConfigError`s (exit 2) whose message names the offending key, e.g.
``unknown key 'algorithm.delta_hihg' (did you mean 'algorithm.delta_high'?)``.
"""

from aapo_megatron.config.loader import (
    ConfigError,
    describe,
    dump_yaml,
    field_docs,
    from_dict,
    load,
    load_raw_config,
    parse_override,
)
from aapo_megatron.config.schema import (
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PlanConfig,
    RewardConfig,
    RolloutConfig,
    ScratchModelConfig,
    TrainerConfig,
)
from aapo_megatron.config.checks import check_finite, check_sampling

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "PlanConfig", "RewardConfig", "RolloutConfig", "ScratchModelConfig",
    "TrainerConfig", "check_finite", "check_sampling", "describe", "dump_yaml", "field_docs", "from_dict", "load",
    "load_raw_config", "parse_override",
]
