"""Policy losses: aapo_ce against the loss in docs/algorithms.md, grpo_clip against a by-hand PPO/k3 computation, and the
fused logits path against the unfused one."""

import pytest
import torch

from aapo_megatron.algorithms import (
    POLICY_LOSSES,
    GlobalTokenMean,
    PolicyLossInputs,
    build_policy_loss,
    default_loss_name,
    policy_loss_from_logits,
)
from aapo_megatron.config import AlgorithmConfig


def _batch(gen, b=3, s=5):
    logp = -torch.rand(b, s, generator=gen) * 3
    adv = torch.randn(b, 1, generator=gen).expand(b, s).contiguous()
    mask = (torch.rand(b, s, generator=gen) > 0.3).float()
    return logp, adv, mask


def test_defaults_and_registry():
    assert POLICY_LOSSES.names() == ["aapo_ce", "grpo_clip", "sft_ce"]
    assert default_loss_name(AlgorithmConfig(name="aapo")) == "aapo_ce"
    assert default_loss_name(AlgorithmConfig(name="dr_grpo")) == "grpo_clip"
    assert default_loss_name(AlgorithmConfig(name="grpo", loss="aapo_ce")) == "aapo_ce"
    assert default_loss_name(AlgorithmConfig(name="rloo")) == "aapo_ce"  # declared where rloo is registered


def test_aapo_ce_is_advantage_weighted_token_mean():
    gen = torch.Generator().manual_seed(0)
    logp, adv, mask = _batch(gen)
    logp.requires_grad_(True)
    out = build_policy_loss(AlgorithmConfig(name="aapo"))(logp, PolicyLossInputs(adv, mask), GlobalTokenMean(mask.sum()))
    expected = -(adv * logp * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / mask.sum())


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_clip_by_hand(beta):
    cfg = AlgorithmConfig(name="grpo", clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=beta)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.9, -0.5, -0.9]])
    ref = torch.tensor([[-1.2, -2.0, -0.4, -1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = build_policy_loss(cfg)(logp, PolicyLossInputs(adv, mask, old_logp=old, ref_logp=ref), GlobalTokenMean(3.0))
    total = 0.0
    for j in range(3):  # masked token 3 excluded
        rho = torch.exp(logp[0, j] - old[0, j]).item()
        a = adv[0, j].item()
        per = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
        lr = ref[0, j].item() - logp[0, j].item()
        per += beta * (torch.exp(torch.tensor(lr)).item() - lr - 1)
        total += per
    assert out.loss.item() == pytest.approx(total / 3, rel=1e-6)
    assert out.metrics["clip_fraction"].item() == pytest.approx(1 / 3)  # token 0: rho = e^0.5 > 1.28 with A > 0
    if beta:
        assert "kl/reference" in out.metrics
        with pytest.raises(ValueError, match="grpo_clip with kl_beta > 0 needs ref_logp"):
            build_policy_loss(cfg)(logp, PolicyLossInputs(adv, mask, old_logp=old), GlobalTokenMean(3.0))


def test_shape_and_token_count_errors():
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) must equal the log-prob shape \(2, 3\)"):
        build_policy_loss(AlgorithmConfig())(torch.zeros(2, 3), PolicyLossInputs(torch.zeros(2, 3), torch.ones(2, 4)),
                                             GlobalTokenMean(1.0))
    with pytest.raises(ValueError, match="num_tokens_in_step must be > 0"):
        GlobalTokenMean(0.0)


@pytest.mark.parametrize("name,loss", [("aapo", None), ("grpo", "grpo_clip"), ("aapo", "sft_ce")])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_logits_path_matches_unfused(name, loss, inplace):
    gen = torch.Generator().manual_seed(3)
    b, s, v = 2, 6, 301
    cfg = AlgorithmConfig(name=name, loss=loss, kl_beta=0.1 if name == "grpo" else 0.0)
    loss_fn = build_policy_loss(cfg)
    x0 = torch.randn(b, s, v, generator=gen) * 2
    target = torch.randint(0, v, (b, s), generator=gen)
    _, adv, mask = _batch(gen, b, s)
    old = -torch.rand(b, s, generator=gen) * 6
    ref = -torch.rand(b, s, generator=gen) * 6
    inputs = PolicyLossInputs(adv, mask, old_logp=old, ref_logp=ref)
    norm = GlobalTokenMean(float(mask.sum()) + 4.0, grad_scale=2.0)  # other micro-batches hold 4 more tokens
    grads, losses = [], []
    for fused in (False, True):
        leaf = x0.clone().requires_grad_(True)
        out = policy_loss_from_logits(loss_fn, leaf * 1, target, inputs, norm, fused=fused, inplace=inplace)
        out.loss.backward()
        grads.append(leaf.grad)
        losses.append(out.loss.detach())
        assert set(out.metrics) >= {"loss", "entropy"}
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    # and the unfused loss equals the formula on log_softmax
    lp = torch.log_softmax(x0, -1).gather(-1, target[..., None])[..., 0]
    if name == "aapo" and loss is None:
        torch.testing.assert_close(losses[0], -(adv * lp * mask).sum() * 2.0 / norm.num_tokens_in_step, rtol=1e-5,
                                   atol=1e-6)
