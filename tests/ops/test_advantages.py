"""The compiled grouped-advantage op vs its pure-torch reference and vs a plain-Python evaluation of the formula."""

import math

import pytest
import torch

from aapo_megatron.ops import grouped_advantages, grouped_advantages_reference


def _random_rewards(gen, n, f, nan_frac=0.2, discrete=False):
    r = torch.randint(0, 3, (n, f), generator=gen).float() if discrete else torch.randn(n, f, generator=gen)
    r[torch.rand(n, f, generator=gen) < nan_frac] = float("nan")
    return r


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pairing", ["paired", "group_mean"])
@pytest.mark.parametrize("scale", [True, False])
def test_matches_reference_random_shapes(seed, pairing, scale):
    gen = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 9, (1,), generator=gen))
    g = int(torch.randint(2, 9, (1,), generator=gen))
    f = int(torch.randint(1, 4, (1,), generator=gen))
    g_ref = g if pairing == "paired" else int(torch.randint(1, 6, (1,), generator=gen))
    r = _random_rewards(gen, b * g, f, discrete=seed % 2 == 0)  # discrete rewards give equal-reward groups
    rr = _random_rewards(gen, b * g_ref, f, discrete=seed % 2 == 0)
    w = torch.rand(f, generator=gen) + 0.5
    kw = dict(weights=w, ref_rewards=rr, scale=scale, eps=1e-4, delta_low=0.2, delta_high=0.28, pairing=pairing)
    got, ref = grouped_advantages(r, g, **kw), grouped_advantages_reference(r, g, **kw)
    for name in ("rewards", "ref_rewards", "advantages", "advantages_no_margin", "group_mean", "group_std"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-6, msg=name)
    assert torch.equal(got.zero_variance, ref.zero_variance)


def test_formula_by_hand_with_equal_groups_and_nan():
    # group 0: all rewards equal (zero variance); group 1: a NaN function and an all-NaN sample (sums to 0)
    nan = float("nan")
    r = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [2.0, nan], [nan, nan], [0.0, 1.0]])
    rr = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.5], [1.0, 1.0], [0.0, 0.0], [nan, 3.0]])
    w = torch.tensor([1.0, 2.0])
    out = grouped_advantages(r, 3, weights=w, ref_rewards=rr, eps=1e-4, delta_low=0.2, delta_high=0.28)
    sums = [2.0, 2.0, 2.0, 2.0, 0.0, 2.0]
    ref_sums = [0.0, 2.0, 2.0, 3.0, 0.0, 6.0]
    expected = []
    for grp in range(2):
        vals = sums[3 * grp : 3 * grp + 3]
        mu = sum(vals) / 3
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / 2)
        for j in range(3):
            i = 3 * grp + j
            expected.append((vals[j] - mu) / (sd + 1e-4) + min(max(sums[i] - ref_sums[i], -0.2), 0.28))
    assert out.rewards.tolist() == sums
    assert out.ref_rewards.tolist() == ref_sums
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert out.zero_variance.tolist() == [True, False]
    assert out.advantages_no_margin[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.advantages[:3].tolist() == pytest.approx([0.28, 0.0, 0.0])


def test_group_of_one_without_scaling():
    out = grouped_advantages(torch.tensor([3.0, 1.0]), 1, scale=False, ref_rewards=torch.tensor([0.0, 1.1]))
    assert out.advantages_no_margin.tolist() == [0.0, 0.0]
    torch.testing.assert_close(out.advantages, torch.tensor([0.28, -0.1]))
    assert torch.isnan(out.group_std).all()


@pytest.mark.parametrize("fn", [grouped_advantages, grouped_advantages_reference])
def test_errors(fn):
    with pytest.raises(ValueError, match=r"number of samples 10 \(B\*G\) is not divisible by group_size G=4"):
        fn(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size G=1 with std scaling"):
        fn(torch.zeros(4), 1, scale=True)
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor, got torch.int64"):
        fn(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="reference_pairing must be 'paired' or 'group_mean', got 'pairs'"):
        fn(torch.zeros(4), 2, pairing="pairs")
    with pytest.raises(ValueError, match=r"rewards must be \[num_samples\] or \[num_samples, num_functions\]"):
        fn(torch.zeros(4, 1, 1), 2)


def test_compiled_op_errors():
    with pytest.raises(RuntimeError, match="rewards has 3 reward functions but weights has 2"):
        grouped_advantages(torch.zeros(4, 3), 2, weights=torch.ones(2))
    with pytest.raises(RuntimeError, match="paired reference needs one reference sample per policy sample: "
                       "ref_rewards has 6 rows, rewards has 4"):
        grouped_advantages(torch.zeros(4), 2, ref_rewards=torch.zeros(6))
    with pytest.raises(RuntimeError, match=r"group_mean reference needs the same number of groups \(B=2\)"):
        grouped_advantages(torch.zeros(4), 2, ref_rewards=torch.zeros(3), pairing="group_mean")
    with pytest.raises(RuntimeError, match="delta_low and delta_high must be >= 0"):
        grouped_advantages(torch.zeros(4), 2, delta_low=-0.1)
    with pytest.raises(RuntimeError, match="group_size G=1 with std scaling"):
        torch.ops.aapo.grouped_advantages(torch.zeros(2, 1), torch.ones(1), None, 1, 1e-4, True, 0.2, 0.28, 0)


def test_nan_weighted_reward_sum_keeps_nan_for_empty_rows():
    r = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [1.0, 2.0]])
    out = torch.ops.aapo.nan_weighted_reward_sum(r, torch.tensor([2.0, 3.0]))
    assert out[0].item() == 2.0 and math.isnan(out[1].item()) and out[2].item() == 8.0
