"""Validation of a loaded training Config against the code: cross-field constraints and the names the config
holds (algorithm, loss, model family, weight transport, reward functions) checked against their registries.

`load_config` loads and validates; `validate` runs every check, in this order: non-finite numbers, the model,
the parallel layout, then each section's ranges (`config.checks`), the rollout layout, the estimator's own checks
(`AdvantageEstimator.check_config`) and the up-front checks beyond single fields (`check_upfront`: reward names,
greedy rollouts with sampling, server placement with an SFT warm start). `aapo-train` calls `check_input_files`
right after loading the config (validation itself stays independent of the machine, so that configs naming data
on a cluster filesystem load anywhere). Either way a mistake exits 2 (`ConfigError`, naming the key) before any
tokenizer, model, SFT step, engine or data loading starts.

This module sits above the registries it checks against (algorithms, models, rollout, rewards, data); the
schema and the loader (`aapo_megatron.config`) stay below everything. It imports torch only through the
registered estimators and losses: `registries=False` skips those checks, for a login node's python without torch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from aapo_megatron.config.checks import check, check_finite, check_sampling, non_negative, positive
from aapo_megatron.config.loader import ConfigError, load
from aapo_megatron.config.schema import Config, RolloutConfig
from aapo_megatron.errors import BadInputError


def registered(registry: Any, name: str, key: str) -> Any:
    """`registry.get(name)`, its unknown-name error (with did-you-mean) as a ConfigError naming `key`."""
    try:
        return registry.get(name)
    except ValueError as exc:
        raise ConfigError(f"'{key}': {exc}") from None


def check_algorithm(cfg: Config) -> None:
    """algorithm.name and algorithm.loss against their registries, then the estimator's own checks."""
    from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES  # the package registers them all

    a = cfg.algorithm
    if a.name == "sft":
        raise ConfigError("'algorithm.name' sft is not an advantage estimator: set trainer.mode=sft for a "
                          "supervised-only run (it runs trainer.sft_steps of SFT)")
    estimator = registered(ADVANTAGE_ESTIMATORS, a.name, "algorithm.name")
    if a.loss is not None:
        registered(POLICY_LOSSES, a.loss, "algorithm.loss")
    if cfg.trainer.mode != "rl":
        return  # no advantages are computed
    try:
        estimator.check_config(cfg)
    except BadInputError as exc:
        raise ConfigError(str(exc)) from None


def _check_backend(r: RolloutConfig) -> None:
    from aapo_megatron.rollout.backends import check_backend

    try:
        check_backend(r.backend, r.placement)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_weight_transport(r: RolloutConfig) -> None:
    from aapo_megatron.rollout.transport.registry import CHOICES, check_transport, is_loopback_url

    check(r.weight_transport in CHOICES, "rollout.weight_transport", f"must be one of {', '.join(CHOICES)}",
          r.weight_transport)
    if r.weight_transport != "auto":
        try:
            check_transport(r.weight_transport, placement=r.placement,
                            same_host=r.placement != "server" or is_loopback_url(r.server_url))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def model_shape(cfg: Config) -> dict[str, int]:
    """Heads, KV heads and layers of the configured model (reads config.json when `model.path` is an HF dir)."""
    if cfg.model.path is None:
        s = cfg.model.scratch
        return {"num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads,
                "num_layers": s.num_layers}
    hf_cfg = os.path.join(cfg.model.path, "config.json")
    if not os.path.isfile(hf_cfg):
        return {}
    with open(hf_cfg) as fh:
        hf = json.load(fh)
    heads = hf.get("num_attention_heads")
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads", heads),
        "num_layers": hf.get("num_hidden_layers"),
    }


def _check_model(cfg: Config) -> None:
    from aapo_megatron.models.families import FAMILIES

    s = cfg.model.scratch
    if s.architecture not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(s.architecture, list(FAMILIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"'model.scratch.architecture': unknown model family {s.architecture!r}{hint}; "
                          f"known: {', '.join(sorted(FAMILIES))}")
    positive(s, "model.scratch", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
             "ffn_hidden_size", "vocab_size", "max_position_embeddings", "rope_theta")
    check(s.hidden_size % s.num_attention_heads == 0, "model.scratch.hidden_size",
          f"must be divisible by num_attention_heads={s.num_attention_heads}", s.hidden_size)
    check(s.num_attention_heads % s.num_key_value_heads == 0, "model.scratch.num_key_value_heads",
          f"must divide num_attention_heads={s.num_attention_heads}", s.num_key_value_heads)


def _check_parallel(cfg: Config, shape: dict[str, int], world_size: Optional[int]) -> None:
    p = cfg.parallel
    positive(p, "parallel", "tensor_model_parallel_size", "pipeline_model_parallel_size", "timeout_minutes")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if shape.get("num_attention_heads"):
        heads = shape["num_attention_heads"]
        check(heads % tp == 0, "parallel.tensor_model_parallel_size",
              f"must divide the number of attention heads ({heads})", tp)
        kv = shape.get("num_key_value_heads") or heads
        check(kv % tp == 0, "parallel.tensor_model_parallel_size",
              f"must divide the number of key/value heads ({kv})", tp)
    if shape.get("num_layers"):
        layers = shape["num_layers"]
        check(layers % pp == 0, "parallel.pipeline_model_parallel_size",
              f"must divide the number of layers ({layers})", pp)
    if world_size is not None:
        check(world_size % (tp * pp) == 0, "parallel",
              f"tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp} must divide the world size "
              f"({world_size}); tp={tp}, pp={pp}", world_size)
    if p.sequence_parallel and tp == 1:
        raise ConfigError("'parallel.sequence_parallel' needs tensor_model_parallel_size > 1")


def validate(cfg: Config, world_size: Optional[int] = None, registries: bool = True) -> None:
    """Range and cross-field checks. `world_size` (when known) must be divisible by TP*PP. registries=False skips
    the checks that import the registered estimators and losses (they need torch), for a login node's python."""
    check_finite(cfg)  # inf / NaN anywhere (YAML .inf, --set x=nan), before the range checks below
    _check_model(cfg)
    shape = model_shape(cfg)
    _check_parallel(cfg, shape, world_size)
    rl = cfg.trainer.mode == "rl"

    a = cfg.algorithm
    positive(a, "algorithm", "eps")
    non_negative(a, "algorithm", "delta_low", "delta_high", "clip_eps_low", "clip_eps_high", "kl_beta")
    check(a.clip_eps_low < 1, "algorithm.clip_eps_low", "must be < 1", a.clip_eps_low)

    r = cfg.rollout
    positive(r, "rollout", "num_generations", "weight_sync_bucket_mb", "weight_sync_timeout_s", "server_timeout_s",
             "tensor_parallel_size", "data_parallel_size")
    check_sampling("rollout", temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                   max_new_tokens=r.max_new_tokens)
    check(0 < r.memory_fraction < 1, "rollout.memory_fraction", "must be in (0, 1)", r.memory_fraction)
    if r.placement == "server" and not r.server_url:
        raise ConfigError("'rollout.server_url' is required when rollout.placement is 'server'")
    _check_backend(r)
    _check_weight_transport(r)
    from aapo_megatron.rollout.layout import check_layout

    check_layout(r, shape.get("num_attention_heads"), shape.get("num_key_value_heads"))
    if registries:
        check_algorithm(cfg)

    w = cfg.reward
    positive(w, "reward", "num_workers", "timeout_s")
    if rl:
        check(len(w.functions) > 0, "reward.functions", "must name at least one reward function", w.functions)

    d = cfg.data
    positive(d, "data", "prompts_per_step", "max_prompt_tokens", "train_size")
    non_negative(d, "data", "eval_size")
    if d.source in ("jsonl", "parquet") and rl and cfg.trainer.steps > 0:
        check(d.train_path is not None, "data.train_path", f"is required when data.source is '{d.source}'",
              d.train_path)

    o = cfg.optim
    positive(o, "optim", "lr", "adam_eps")
    non_negative(o, "optim", "min_lr", "warmup_steps", "weight_decay", "clip_grad")
    check(0 <= o.adam_beta1 < 1, "optim.adam_beta1", "must be in [0, 1)", o.adam_beta1)
    check(0 <= o.adam_beta2 < 1, "optim.adam_beta2", "must be in [0, 1)", o.adam_beta2)
    check(o.min_lr <= o.lr, "optim.min_lr", f"must be <= optim.lr ({o.lr})", o.min_lr)

    t = cfg.trainer
    non_negative(t, "trainer", "steps", "eval_every", "sft_steps")
    check(rl or t.sft_steps > 0, "trainer.sft_steps", "must be > 0 with trainer.mode=sft (it runs only these)",
          t.sft_steps)
    positive(t, "trainer", "sft_lr", "sft_batch_size")
    check("{answer}" in t.sft_target, "trainer.sft_target", "must contain the placeholder {answer}", t.sft_target)
    positive(t, "trainer", "updates_per_step", "micro_batch_tokens", "max_bad_steps", "pack_factor")
    from aapo_megatron.models.activation_memory import validate_recompute

    validate_recompute(t, shape.get("num_layers"), cfg.parallel.pipeline_model_parallel_size)
    n_samples = d.prompts_per_step * r.num_generations
    check(n_samples % t.updates_per_step == 0, "trainer.updates_per_step",
          f"must divide prompts_per_step * num_generations = {n_samples}", t.updates_per_step)

    c = cfg.checkpoint
    non_negative(c, "checkpoint", "save_every")
    positive(c, "checkpoint", "keep_last")
    positive(cfg.plan, "plan", "device_memory_gb")
    non_negative(cfg.plan, "plan", "reserve_gb")
    check_upfront(cfg)  # reward names and options against the registry, server placement with SFT


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, registries: bool = True) -> Config:
    """A validated training Config from an optional YAML file plus `a.b=value` overrides (`validate`)."""
    return load(Config, path, overrides, validate=lambda cfg: validate(cfg, registries=registries))


def check_reward_names(functions: Mapping[str, float], key: str = "reward.functions") -> None:
    """ConfigError unless every name is a registered reward function or an importable "pkg.module:fn"."""
    from aapo_megatron.rewards.registry import RewardError, resolve_reward

    for name in functions:
        try:
            resolve_reward(name)
        except RewardError as exc:
            raise ConfigError(f"'{key}.{name}': {exc}") from None


def check_reward_options(reward: Any, key: str = "reward") -> None:
    """ConfigError unless every `reward.options.<fn>` names a function of reward.functions and holds only that
    function's declared options, with valid values (`reward` is a RewardConfig)."""
    from aapo_megatron.rewards.registry import build_options

    for name in reward.options:
        if name not in reward.functions:
            raise ConfigError(f"'{key}.options.{name}': {name!r} is not one of {key}.functions "
                              f"({', '.join(reward.functions)}); options sit under a configured function")
        options = build_options(name, reward)
        if hasattr(options, "check"):
            options.check(f"{key}.options.{name}.")


def check_server_with_sft(cfg: Any) -> None:
    """ConfigError for rollout.placement=server with an SFT warm start when the algorithm samples the reference:
    the reference server serves the model it was started with, which cannot be this run's warm start."""
    a, t = cfg.algorithm, cfg.trainer
    if cfg.rollout.placement != "server" or t.sft_steps == 0 or t.mode == "sft":
        return
    from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS

    if ADVANTAGE_ESTIMATORS.get(a.name).uses_reference:
        raise ConfigError(
            f"'trainer.sft_steps' must be 0 with rollout.placement=server and algorithm.name={a.name} (it samples "
            f"the reference), got {t.sft_steps}: the reference server serves the model it was started with, not "
            f"this run's SFT warm start. Run the SFT first (trainer.mode=sft), serve its hf_final as the "
            f"reference and start RL from it (model.path)")


def check_upfront(cfg: Any) -> None:
    """The checks of a training Config that need the registries (`cfg` is a Config)."""
    if cfg.trainer.mode == "rl":
        check_reward_names(cfg.reward.functions)
        check_reward_options(cfg.reward)
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
