"""Advantage estimators built from AlgorithmConfig: aapo against the formula in docs/algorithms.md, grpo, dr_grpo, metrics."""

import math
import statistics

import pytest
import torch

from aapo_megatron.algorithms import ADVANTAGE_ESTIMATORS, build_advantage_estimator
from aapo_megatron.config import AlgorithmConfig


def _aapo_by_hand(r, r_ref, g, scale, eps, dl, dh, pairing):
    """Independent plain-Python evaluation of the AAPO advantage (docs/algorithms.md)."""
    out = []
    for start in range(0, len(r), g):
        grp = r[start : start + g]
        mu = statistics.fmean(grp)
        sd = statistics.stdev(grp)  # unbiased
        g_ref = len(r_ref) * g // len(r)
        ref_mean = statistics.fmean(r_ref[start // g * g_ref : (start // g + 1) * g_ref])
        for j, ri in enumerate(grp):
            base = (ri - mu) / (sd + eps) if scale else ri - mu
            ref = r_ref[start + j] if pairing == "paired" else ref_mean
            out.append(base + min(max(ri - ref, -dl), dh))
    return out


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("pairing", ["paired", "group_mean"])
@pytest.mark.parametrize("scale", [True, False])
def test_aapo_matches_design_formula(backend, pairing, scale):
    gen = torch.Generator().manual_seed(7)
    b, g = 5, 6
    r = torch.randint(0, 2, (b * g,), generator=gen).float()  # 0/1 accuracy rewards: some groups all-equal
    r[:g] = 1.0
    r = r + 0.1 * torch.rand(b * g, generator=gen) * (torch.arange(b * g) >= 2 * g)
    r_ref = torch.rand(b * g, generator=gen)
    cfg = AlgorithmConfig(name="aapo", scale_rewards=scale, eps=1e-4, delta_low=0.2, delta_high=0.28,
                          reference_pairing=pairing)
    res = build_advantage_estimator(cfg, backend)(r, g, ref_rewards=r_ref)
    expected = _aapo_by_hand(r.double().tolist(), r_ref.double().tolist(), g, scale, 1e-4, 0.2, 0.28, pairing)
    torch.testing.assert_close(res.advantages.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6,
                               atol=1e-6)
    assert res.grouped.zero_variance[0].item() is True


def test_grpo_and_dr_grpo_have_no_margin():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    grpo = build_advantage_estimator(AlgorithmConfig(name="grpo"))(r, 4, ref_rewards=torch.zeros(8))
    sd = statistics.stdev([1.0, 0.0, 0.0, 1.0])
    a = 0.5 / (sd + 1e-4)
    assert grpo.advantages[:4].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    assert torch.equal(grpo.advantages, grpo.grouped.advantages_no_margin)
    dr = build_advantage_estimator(AlgorithmConfig(name="dr_grpo", scale_rewards=True))(r, 4)
    assert dr.advantages.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])


def test_metrics():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    ref = torch.tensor([0.0, 1.0, 1.0, 1.0])
    res = build_advantage_estimator(AlgorithmConfig(name="aapo"))(r, 2, ref_rewards=ref)
    m = res.metrics()
    assert m["zero_variance_group_fraction"] == 0.5
    base = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert m["mean_abs_advantage_no_margin"] == pytest.approx(base / 2, rel=1e-6)
    # margins: +0.28 (clamped), 0, -0.2 (clamped), 0
    assert m["mean_abs_advantage"] == pytest.approx((0.28 + 0 + abs(-base - 0.2) + base) / 4, rel=1e-6)
    assert m["margin_mean"] == pytest.approx(0.02, abs=1e-6)
    assert m["reward_mean"] == 0.75 and m["ref_reward_mean"] == 0.75


def test_errors_and_registry():
    assert ADVANTAGE_ESTIMATORS.names() == ["aapo", "dr_grpo", "grpo", "rloo"]
    with pytest.raises(ValueError, match="'aapo' needs reference rewards"):
        build_advantage_estimator(AlgorithmConfig(name="aapo"))(torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'sft'"):  # SFT is trainer.mode=sft
        build_advantage_estimator(AlgorithmConfig(name="sft"))
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grpoo' \(did you mean 'grpo'\?\)"):
        ADVANTAGE_ESTIMATORS.get("grpoo")
    with pytest.raises(ValueError, match="group_size G=1 with std scaling"):
        build_advantage_estimator(AlgorithmConfig(name="grpo"))(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"number of samples 6 \(B\*G\) is not divisible by group_size G=4"):
        build_advantage_estimator(AlgorithmConfig(name="dr_grpo"))(torch.zeros(6), 4)
