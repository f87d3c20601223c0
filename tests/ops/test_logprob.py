"""The compiled vocab-parallel log-prob/entropy op (TP=1) vs the pure-torch reference, including its gradient."""

import pytest
import torch

from aapo_megatron.ops import fused_logprob_loss, logprob_reference, vocab_parallel_logprob
from tests.ops.grad_check import assert_grad_close

# (N, V): tails (V % 32 != 0), V < one vector step, several L1 blocks (block = 4096)
SHAPES = [(1, 7), (5, 33), (37, 1001), (16, 4096), (9, 9000)]


def _logits(gen, n, v, dtype, extreme=False):
    x = torch.randn(n, v, generator=gen) * 4
    if extreme and n >= 4 and v >= 8:
        x[0, 1] = 1e4  # one dominant logit
        x[1] = -1e4 + torch.randn(v, generator=gen)  # large common offset
        x[2, : v // 2] = float("-inf")  # masked-out half
        x[3, ::3] = -1e4
    return x.to(dtype)


def _reference_grads(x, target, g_logp, g_ent):
    xr = x.detach().double().requires_grad_(True)
    lp, h = _ref64(xr, target)
    (lp * g_logp.double() + h * g_ent.double()).sum().backward()
    return lp.detach(), h.detach(), xr.grad


def _ref64(x, target):
    logsm = torch.log_softmax(x, dim=-1)
    p = logsm.exp()
    return logsm.gather(-1, target[:, None])[:, 0], -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)


def _targets(gen, x):
    """Random targets, avoiding -inf logits (their log-prob is -inf, tested separately)."""
    n, v = x.shape
    t = torch.randint(0, v, (n,), generator=gen)
    finite = torch.isfinite(x.float())
    for i in range(n):
        if not finite[i, t[i]]:
            t[i] = int(torch.nonzero(finite[i])[0])
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_forward_backward_matches_reference(n, v, dtype, extreme):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    x0 = _logits(gen, n, v, dtype, extreme)
    t = _targets(gen, x0)
    g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    lp_ref, h_ref, grad_ref = _reference_grads(x0, t, g_logp, g_ent)

    x = x0.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprob(x, t)
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    (lp * g_logp + h * g_ent).sum().backward()
    torch.testing.assert_close(lp.double(), lp_ref, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(h.double(), h_ref, rtol=0, atol=2e-5)
    assert x.grad.dtype == dtype
    assert_grad_close(x.grad, grad_ref, dtype)

    # the fused TP=1 pass (gradient in the forward from the kept exponentials), across blocks and -inf blocks
    _, _, grad_ref_lp = _reference_grads(x0, t, g_logp, torch.zeros(n))
    for inplace in (False, True):
        leaf = x0.clone().requires_grad_(True)
        loss, lp_f, h_f = fused_logprob_loss(leaf * 1, t, g_logp, inplace=inplace)
        loss.backward()
        torch.testing.assert_close(lp_f.double(), lp_ref, rtol=1e-6, atol=2e-5)
        torch.testing.assert_close(h_f.double(), h_ref, rtol=0, atol=2e-5)
        assert_grad_close(leaf.grad, grad_ref_lp, dtype)


def test_leading_dims_and_minus_inf_target():
    x = torch.randn(3, 2, 50)
    x[1, 0, 4] = float("-inf")
    t = torch.randint(0, 50, (3, 2))
    t[1, 0] = 4
    lp, h = vocab_parallel_logprob(x, t)
    lp_ref, h_ref = logprob_reference(x, t)
    assert lp.shape == (3, 2) and lp[1, 0].item() == float("-inf")
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_reuses_logits_buffer(dtype):
    gen = torch.Generator().manual_seed(0)
    leaf = (torch.randn(8, 300, generator=gen) * 3).to(dtype).requires_grad_(True)
    t = torch.randint(0, 300, (8,), generator=gen)
    g = torch.randn(8, generator=gen)
    _, _, grad_ref = _reference_grads(leaf, t, g, torch.zeros(8))
    logits = leaf * 1  # the "output layer" result; nothing else needs it after the loss
    seen = {}
    logits.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
    lp, _ = vocab_parallel_logprob(logits, t, inplace_backward=True)
    (lp * g).sum().backward()
    assert seen["ptr"] == logits.data_ptr()  # the gradient lives in the logits' memory
    assert_grad_close(leaf.grad, grad_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_gradient_in_forward(dtype, inplace):
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.randn(12, 777, generator=gen) * 3).to(dtype)
    t = torch.randint(0, 777, (12,), generator=gen)
    coef = torch.randn(12, generator=gen)
    lp_ref, _, grad_ref = _reference_grads(x0, t, coef, torch.zeros(12))

    leaf = x0.clone().requires_grad_(True)
    loss, lp, _ = fused_logprob_loss(leaf * 1, t, coef, inplace=inplace)  # tensor coefficients: one fused pass
    (3.0 * loss).backward()  # the stored gradient is scaled by the incoming one
    torch.testing.assert_close(loss.double(), (coef.double() * lp_ref).sum(), rtol=1e-5, atol=1e-4)
    assert not lp.requires_grad
    assert_grad_close(leaf.grad, 3.0 * grad_ref, dtype, scale=3.0)

    # a loss that is non-linear in logp goes through autograd on the [N] log-probs
    leaf = x0.clone().requires_grad_(True)
    fn = lambda lp_: (coef * lp_).sum() + 0.5 * (lp_**2).sum()  # noqa: E731
    loss, _, _ = fused_logprob_loss(leaf * 1, t, fn, inplace=inplace)
    loss.backward()
    _, _, grad_ref2 = _reference_grads(x0, t, coef + lp_ref.float(), torch.zeros(12))
    assert_grad_close(leaf.grad, grad_ref2, dtype, scale=10.0)


def test_errors():
    x = torch.randn(4, 10)
    with pytest.raises(TypeError, match="logits must be float32 or bfloat16, got torch.float16"):
        vocab_parallel_logprob(x.half(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"target\[2\] = 10 is outside the vocabulary \[0, 10\)"):
        vocab_parallel_logprob(x, torch.tensor([0, 1, 10, 3]))
    with pytest.raises(RuntimeError, match=r"target\[0\] = -1 is outside the vocabulary"):
        fused_logprob_loss(x.requires_grad_(), torch.tensor([-1, 1, 2, 3]), torch.ones(4))
    with pytest.raises(ValueError, match=r"target shape \(3,\) must equal logits shape without the vocab dim \(4,\)"):
        vocab_parallel_logprob(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        vocab_parallel_logprob(x, torch.zeros(4))
    with pytest.raises(ValueError, match="contiguous in the vocab dimension"):
        vocab_parallel_logprob(torch.randn(10, 4).t(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cannot be viewed as \[N, V/tp\] without a copy"):
        vocab_parallel_logprob(torch.randn(3, 2, 5).transpose(0, 1), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dloss_dlogp shape \(3,\) must equal target shape \(4,\)"):
        fused_logprob_loss(x, torch.zeros(4, dtype=torch.long), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"shard \[0, 10\) does not fit in the vocabulary \[0, 5\)"):
        torch.ops.aapo.logprob_shard_stats(x, torch.zeros(4, dtype=torch.long), 0, 5)


def test_vectorised_exp_error():
    """ATen's exp_u20 (the kernel's exp): relative error <= 1e-6 over [-80, 0]; flushes to 0 below ~-87.3."""
    x = torch.linspace(-80.0, 0.0, 400_001)
    got = torch.ops.aapo.vec_exp_u20(x).double()
    rel = ((got - x.double().exp()) / x.double().exp()).abs().max().item()
    assert rel < 1e-6, rel
    assert torch.ops.aapo.vec_exp_u20(torch.tensor([float("-inf"), -100.0, 0.0])).tolist() == [0.0, 0.0, 1.0]
