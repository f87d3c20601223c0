"""Per-function reward options (reward.options.<function>.<key>): declared by the function, checked up front with
the key named, old flat keys pointed at their new home, and the values reach the function."""

import pytest

from aapo_megatron.config import ConfigError, RewardConfig
from aapo_megatron.eval.config import load_eval_config
from aapo_megatron.rewards import RewardInput, resolve_reward
from aapo_megatron.validation import load_config

COSINE = ["reward.functions={accuracy: 1.0, cosine_length: 0.5}"]


def _error(overrides, loader=load_config):
    with pytest.raises(ConfigError) as info:
        loader(None, overrides)
    return str(info.value)


def test_options_reach_the_function():
    cfg = load_config(None, COSINE + ["reward.options.cosine_length.max_len=100",
                                      "reward.options.cosine_length.min_value_correct=0.25"])
    x = RewardInput("\\boxed{2}".ljust(100), {"answer": "2"}, cfg.reward)
    assert x.options("cosine_length").max_len == 100
    assert resolve_reward("cosine_length")(x) == pytest.approx(0.25)  # a correct answer at max_len
    assert RewardInput("", {}, RewardConfig()).options("cosine_length").max_len == 1000  # the default


def test_old_flat_keys_name_their_new_home():
    assert _error(COSINE + ["reward.cosine_max_len=40"]) == (
        "'reward.cosine_max_len' has moved: set 'reward.options.cosine_length.max_len' instead")
    assert "set 'reward.options.format.style' instead" in _error(["reward.format_style=think_close"])


def test_bad_options_are_refused_with_the_key_named():
    assert "unknown key 'reward.options.cosine_length.max_lenn' (did you mean " \
           "'reward.options.cosine_length.max_len'?)" in _error(COSINE + ["reward.options.cosine_length.max_lenn=4"])
    assert "'reward.options.cosine_length.max_len' must be > 0" in _error(
        COSINE + ["reward.options.cosine_length.max_len=0"])
    assert "'reward.options.cosine_length.length_unit' must be one of 'chars', 'tokens'" in _error(
        COSINE + ["reward.options.cosine_length.length_unit=words"])
    assert "'reward.options.format': 'format' is not one of reward.functions (accuracy, cosine_length)" in _error(
        COSINE + ["reward.options.format.style=think_close"])


def test_eval_config_checks_options_the_same_way(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"problem": "1+1", "answer": "2"}\n')
    base = [f"model.path={model}", f"data.files=[{bench}]"]
    msg = _error(base + ["reward.functions={accuracy: 1.0, format: 0.1}", "reward.options.format.style=boxed"],
                 load_eval_config)
    assert "'reward.options.format.style' must be one of 'think_answer', 'think_close', 'marked_answer'" in msg
