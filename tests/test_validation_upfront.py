"""Mistakes that validation refuses before anything starts (exit 2, key named): reward names, non-finite
numbers, missing or unreadable data files, server placement with an SFT warm start; and the real `aapo-train`
CLI refusing them before the tokenizer, model or SFT phase."""

import gzip
import os
import subprocess
import sys

import pytest

from aapo_megatron.config import ConfigError
from aapo_megatron.validation import load_config
from aapo_megatron.eval.config import load_eval_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart_cpu.yaml")
# Small enough that, were a check to regress, the run would reach its SFT phase and fail within a minute.
SMALL = ["trainer.sft_steps=2", "trainer.sft_batch_size=8", "data.train_size=64", "data.eval_size=8"]


def _train_cli(run_dir, *overrides):
    args = [os.path.join(os.path.dirname(sys.executable), "aapo-train"), "--config", QUICKSTART,
            "--set", f"trainer.run_dir={run_dir}"]
    for item in SMALL + list(overrides):
        args += ["--set", item]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("overrides, message", [
    (["reward.functions={acuracy: 1.0}"],
     "aapo-train: config error: 'reward.functions.acuracy': unknown reward function 'acuracy' "
     "(did you mean 'accuracy'?)"),
    (["data.source=jsonl", "data.train_path=/nonexistent/train.jsonl.gz"],
     "aapo-train: config error: 'data.train_path': prompt file not found: /nonexistent/train.jsonl.gz"),
])
def test_cli_refuses_before_any_work(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = _train_cli(run_dir, *overrides)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert message in proc.stderr, out[-3000:]
    assert "SFT warm start" not in out and "loading prompts" not in out
    # Nothing started: not even the run directory (config.yaml, the tokenizer, checkpoints) was written.
    assert not run_dir.exists(), sorted(os.listdir(run_dir))


@pytest.mark.parametrize("override, message", [
    ("reward.functions={acuracy: 1.0}", "'reward.functions.acuracy': unknown reward function 'acuracy' "
                                        "(did you mean 'accuracy'?); registered: accuracy, cosine_length"),
    ("reward.functions={accuracy: 1.0, formatt: 0.5}", "'reward.functions.formatt': unknown reward function "
                                                       "'formatt' (did you mean 'format'?)"),
    ("reward.functions={'no_such_module_xyz:fn': 1.0}", "'reward.functions.no_such_module_xyz:fn': reward function "
                                                        "'no_such_module_xyz:fn': cannot import module"),
    ("reward.functions={'math:no_such_fn': 1.0}", "module 'math' has no callable 'no_such_fn'"),
])
def test_unknown_reward_function_is_a_config_error(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert message in str(err.value)


def test_eval_refuses_unknown_reward_function():
    with pytest.raises(ConfigError) as err:  # aapo-eval shares the reward section
        load_eval_config(None, ["reward.functions={accuracy: 1.0, formatt: 0.5}"])
    assert "'reward.functions.formatt': unknown reward function 'formatt' (did you mean 'format'?)" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a typo of the one correctness function: did-you-mean, not "must include"
        load_eval_config(None, ["reward.functions={acuracy: 1.0}"])
    assert "'reward.functions.acuracy': unknown reward function 'acuracy' (did you mean 'accuracy'?)" in str(err.value)


@pytest.mark.parametrize("override, key, shown", [
    ("optim.lr=inf", "optim.lr", "inf"),
    ("optim.lr=.inf", "optim.lr", "inf"),
    ("rollout.temperature=nan", "rollout.temperature", "nan"),
    ("rollout.weight_sync_timeout_s=.inf", "rollout.weight_sync_timeout_s", "inf"),
    ("reward.timeout_s=inf", "reward.timeout_s", "inf"),
    ("algorithm.eps=.nan", "algorithm.eps", "nan"),
    ("algorithm.delta_high=-inf", "algorithm.delta_high", "-inf"),
    ("reward.functions={reasoning_gym: .nan}", "reward.functions.reasoning_gym", "nan"),
    ("reward.functions={reasoning_gym: inf}", "reward.functions.reasoning_gym", "inf"),
    ("data.reasoning_gym_args={min_terms: 2, scale: [1.0, .inf]}", "data.reasoning_gym_args.scale[1]", "inf"),
])
def test_non_finite_numbers_are_refused(override, key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert str(err.value) == f"'{key}' must be a finite number, got {shown}"


def test_non_finite_numbers_in_yaml_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  functions: {accuracy: 1.0, format: .NaN}\n")
    with pytest.raises(ConfigError, match=r"^'reward.functions.format' must be a finite number, got nan$"):
        load_config(str(path))
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"^'optim.lr' must be a finite number, got inf$"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^'sampling.temperature' must be a finite number, got inf$"):
        load_eval_config(None, ["sampling.temperature=inf"])


def test_data_files_missing_or_unreadable(tmp_path):
    """aapo-train checks the data files right after loading the config (`check_input_files`)."""
    from aapo_megatron.validation import check_input_files

    def check(*overrides):
        check_input_files(load_config(None, ["data.source=jsonl", "data.train_tokenizer=false", *overrides]))

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError) as err:
        check(f"data.train_path={missing}")
    assert str(err.value) == f"'data.train_path': prompt file not found: {missing}"
    good = tmp_path / "train.jsonl"
    good.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(ConfigError) as err:
        check(f"data.train_path={good}", f"data.eval_path={missing}")
    assert str(err.value) == f"'data.eval_path': prompt file not found: {missing}"
    with pytest.raises(ConfigError) as err:
        check(f"data.train_path={tmp_path}")
    assert str(err.value) == f"'data.train_path': {tmp_path}: not a regular file"
    fake_gz = tmp_path / "train.jsonl.gz"
    fake_gz.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(ConfigError) as err:
        check(f"data.train_path={fake_gz}")
    assert str(err.value) == f"'data.train_path': {fake_gz}: named .gz but not gzip data"
    real_gz = tmp_path / "real.jsonl.gz"
    with gzip.open(real_gz, "wt") as fh:
        fh.write('{"problem": "1+1", "answer": "2"}\n')
    check(f"data.train_path={real_gz}", f"data.eval_path={good}")
    # reasoning-gym generates its prompts: a stale path there is never read, so not checked.
    check_input_files(load_config(None, ["data.source=reasoning_gym", f"data.train_path={missing}"]))


def test_server_placement_with_sft_warm_start_is_refused_up_front():
    server = ["rollout.placement=server", "rollout.server_url=http://127.0.0.1:8100"]
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, server)  # the quickstart warm-starts for 200 SFT steps; aapo needs the reference
    assert str(err.value).startswith("'trainer.sft_steps' must be 0 with rollout.placement=server and "
                                     "algorithm.name=aapo (it samples the reference), got 200: the reference server")
    assert load_config(QUICKSTART, server + ["trainer.sft_steps=0"]).trainer.sft_steps == 0
    # grpo never samples the reference, and an SFT-only run starts no engine: both are fine with a warm start.
    assert load_config(QUICKSTART, server + ["algorithm.name=grpo"]).algorithm.name == "grpo"
    assert load_config(QUICKSTART, server + ["trainer.mode=sft"]).trainer.mode == "sft"
