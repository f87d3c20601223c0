"""Config loading, dotted overrides and every validation error (message text asserted)."""

import json

import pytest

from aapo_megatron.config import (
    Config,
    ConfigError,
    describe,
    dump_yaml,
    field_docs,
    parse_override,
)
from aapo_megatron.validation import load_config, validate


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_match_design_doc():
    cfg = load_config()
    a = cfg.algorithm
    assert (a.name, a.eps, a.delta_low, a.delta_high, a.scale_rewards) == ("aapo", 1e-4, 0.2, 0.28, True)
    assert a.reference_pairing == "paired" and a.reference_rollouts == "fresh"
    assert (a.clip_eps_low, a.clip_eps_high) == (0.2, 0.2)


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "algorithm:\n  delta_high: 0.5\n  name: grpo\nrollout:\n  num_generations: 4\noptim:\n  lr: 1e-6\n")
    cfg = load_config(path, ["algorithm.delta_high=0.3", "reward.functions={accuracy: 1.0, format: 0.5}",
                             "model.scratch.hidden_size=64", "checkpoint.resume=auto"])
    assert cfg.algorithm.delta_high == 0.3  # override wins over the file
    assert cfg.algorithm.name == "grpo"
    assert cfg.rollout.num_generations == 4
    assert cfg.optim.lr == 1e-6  # YAML 1.1 reads "1e-6" as a string; it is coerced
    assert cfg.reward.functions == {"accuracy": 1.0, "format": 0.5}
    assert cfg.model.scratch.hidden_size == 64
    assert cfg.checkpoint.resume == "auto"
    assert isinstance(cfg.algorithm.delta_high, float)


def test_int_widens_to_float_and_roundtrip(tmp_path):
    cfg = load_config(None, ["algorithm.delta_low=1"])
    assert cfg.algorithm.delta_low == 1.0 and isinstance(cfg.algorithm.delta_low, float)
    again = load_config(_write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.delta_hihg=0.3", "unknown key 'algorithm.delta_hihg' (did you mean 'algorithm.delta_high'?)"),
        ("algoritm.name=aapo", "unknown key 'algoritm' (did you mean 'algorithm'?)"),
        ("delta_high=0.3", "unknown key 'delta_high' (did you mean 'algorithm.delta_high'?)"),
        ("rollout.num_generations=six", "'rollout.num_generations' must be an integer, got 'six'"),
        ("rollout.num_generations=2.5", "'rollout.num_generations' must be an integer, got 2.5"),
        ("algorithm.scale_rewards=yes please", "'algorithm.scale_rewards' must be a boolean (true/false), got 'yes please'"),
        ("algorithm.name=aapoo", "'algorithm.name': unknown advantage estimator 'aapoo' (did you mean 'aapo'?); known: aapo, dr_grpo, grpo, rloo"),
        ("algorithm.name=sft", "'algorithm.name' sft is not an advantage estimator: set trainer.mode=sft"),
        ("algorithm.loss=grpo_clipp", "'algorithm.loss': unknown policy loss 'grpo_clipp' (did you mean 'grpo_clip'?); known: aapo_ce, grpo_clip, sft_ce"),
        ("model.scratch.architecture=lama", "'model.scratch.architecture': unknown model family 'lama' (did you mean 'llama'?); known: llama, qwen2, qwen3"),
        ("trainer.mode=sft", "'trainer.sft_steps' must be > 0 with trainer.mode=sft (it runs only these), got 0"),
        ("rollout.top_k=0", "'rollout.top_k' must be -1 (off) or > 0, got 0"),
        ("algorithm.delta_low=-0.1", "'algorithm.delta_low' must be >= 0, got -0.1"),
        ("rollout.top_p=1.5", "'rollout.top_p' must be in (0, 1], got 1.5"),
        ("rollout.memory_fraction=0.0", "'rollout.memory_fraction' must be in (0, 1), got 0.0"),
        ("optim.lr=0", "'optim.lr' must be > 0, got 0.0"),
        ("reward.functions=[accuracy]", "'reward.functions' must be a mapping (dict[str, float]), got ['accuracy']"),
        ("reward.functions={accuracy: high}", "'reward.functions.accuracy' must be a number, got 'high'"),
        ("model=3", "'model' must be a mapping, got int (3)"),
        ("rollout.num_generations=1", "'rollout.num_generations' must be >= 2 when algorithm.scale_rewards is on"),
        ("parallel.tensor_model_parallel_size=3", "'parallel.tensor_model_parallel_size' must divide the number of attention heads (4), got 3"),
        ("parallel.pipeline_model_parallel_size=3", "'parallel.pipeline_model_parallel_size' must divide the number of layers (2), got 3"),
        ("trainer.updates_per_step=5", "'trainer.updates_per_step' must divide prompts_per_step * num_generations = 48, got 5"),
        ("parallel.sequence_parallel=true", "'parallel.sequence_parallel' needs tensor_model_parallel_size > 1"),
        ("rollout.placement=server", "'rollout.server_url' is required when rollout.placement is 'server'"),
        ("optim.min_lr=1.0", "'optim.min_lr' must be <= optim.lr (1e-06), got 1.0"),
        ("no_equals_sign", "override 'no_equals_sign' must look like section.key=value"),
    ],
)
def test_validation_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.source=reasoning_gym", override])
    assert message in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid keys here: .*delta_low, delta_high"):
        load_config(None, ["algorithm.delta=0.1"])


def test_kv_heads_must_be_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"must divide the number of key/value heads \(2\), got 4"):
        load_config(None, ["data.source=reasoning_gym", "model.scratch.num_attention_heads=8",
                           "model.scratch.hidden_size=128", "parallel.tensor_model_parallel_size=4"])


def test_world_size_must_be_divisible_by_tp_times_pp():
    cfg = load_config(None, ["data.source=reasoning_gym", "parallel.tensor_model_parallel_size=2",
                             "parallel.pipeline_model_parallel_size=2"])
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match=r"= 4 must divide the world size \(6\); tp=2, pp=2"):
        validate(cfg, world_size=6)


def test_hf_model_shape_is_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 12, "num_key_value_heads": 4, "num_hidden_layers": 6}))
    ok = load_config(None, ["data.source=reasoning_gym", f"model.path={tmp_path}", "parallel.tensor_model_parallel_size=4",
                            "parallel.pipeline_model_parallel_size=3"])
    assert ok.parallel.tensor_model_parallel_size == 4
    with pytest.raises(ConfigError, match=r"must divide the number of layers \(6\), got 4"):
        load_config(None, ["data.source=reasoning_gym", f"model.path={tmp_path}", "parallel.pipeline_model_parallel_size=4"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: /nonexistent.yaml"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "algorithm: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, got list"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"'data.train_path' is required when data.source is 'jsonl'"):
        load_config(None, ["data.source=jsonl"])


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_every_field_is_documented():
    rows = describe(Config)
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert "algorithm.delta_high" in {r[0] for r in rows}
    assert "clamp above" in field_docs(type(Config().algorithm))["delta_high"]


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.rollout.num_generations >= 2, path


def test_config_error_is_bad_input():
    from aapo_megatron.errors import EXIT_BAD_INPUT, BadInputError

    assert issubclass(ConfigError, BadInputError) and ConfigError("x").exit_code == EXIT_BAD_INPUT


def test_sft_mode_needs_no_reward_or_data_path():
    cfg = load_config(None, ["trainer.mode=sft", "trainer.sft_steps=5", "reward.functions={}",
                             "data.source=jsonl", "rollout.num_generations=1"])
    assert cfg.trainer.mode == "sft" and cfg.algorithm.name == "aapo"


def test_did_you_mean_searches_the_schema_being_loaded():
    from aapo_megatron.eval.config import load_eval_config

    with pytest.raises(ConfigError) as err:  # the eval schema has sampling.temperature, not rollout.temperature
        load_eval_config(None, ["temperature=0.5"])
    assert "unknown key 'temperature' (did you mean 'sampling.temperature'?)" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a training-only key: no suggestion of a key eval does not have
        load_eval_config(None, ["num_generations=4"])
    assert str(err.value) == "unknown key 'num_generations'; valid keys here: model, data, sampling, reward, output"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["temperature=0.5"])
    assert "unknown key 'temperature' (did you mean 'rollout.temperature'?)" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("sampling.top_p=0", "'sampling.top_p' must be in (0, 1], got 0.0"),
    ("sampling.top_k=0", "'sampling.top_k' must be -1 (off) or > 0, got 0"),
    ("sampling.temperature=-1", "'sampling.temperature' must be >= 0, got -1.0"),
    ("sampling.max_new_tokens=0", "'sampling.max_new_tokens' must be >= 1, got 0"),
])
def test_eval_shares_the_sampling_range_checks(override, message):
    from aapo_megatron.eval.config import load_eval_config

    with pytest.raises(ConfigError) as err:
        load_eval_config(None, [override])
    assert str(err.value) == message
    train_key = override.replace("sampling.", "rollout.")
    with pytest.raises(ConfigError) as err:
        load_config(None, [train_key])
    assert str(err.value) == message.replace("sampling.", "rollout.")
