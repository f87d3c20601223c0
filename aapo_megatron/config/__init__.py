"""Run configuration: the schema (nested dataclasses with field docstrings), a generic loader (YAML + dotted
overrides, did-you-mean on the schema being loaded) and validation (ranges, names against the registries).

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
from aapo_megatron.config.validation import check_sampling, load_config, model_shape, validate

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "PlanConfig", "RewardConfig", "RolloutConfig", "ScratchModelConfig",
    "TrainerConfig", "check_sampling", "describe", "dump_yaml", "field_docs", "from_dict", "load",
    "load_config", "load_raw_config", "model_shape", "parse_override", "validate",
]
