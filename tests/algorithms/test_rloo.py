"""RLOO (leave-one-out baseline) against hand-computed numbers, its registration and its config checks."""

import pytest
import torch

from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS, build_advantage_estimator, default_loss_name
from aapo_megatron.config import AlgorithmConfig, ConfigError, load_config


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
