"""Log-probs at the sampling temperature: every entry point of the log-prob op gives log_softmax(logits / T) and
its gradient (TP=1; TP=2 in test_logprob_tp.py), and T=1 is the untouched raw-logit path."""

import pytest
import torch

from aapo_megatron.ops import fused_logprob_loss, logprob_reference, vocab_parallel_logprob
from tests.ops.grad_check import assert_grad_close

T = 0.7


def _case(dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(10, 523, generator=gen) * 3).to(dtype)
    x[0, :200] = float("-inf")
    t = torch.randint(200, 523, (10,), generator=gen)
    return x, t, torch.randn(10, generator=gen), torch.randn(10, generator=gen)


def _ref(x, t, g_logp, g_ent, temperature):
    """float64 log_softmax(x / T) at the targets, its entropy, and d(sum(g_logp*lp + g_ent*h))/dx.

    x / T is taken in x's dtype (the op writes the scaled logits once, so bf16 logits are rounded there)."""
    xr = torch.div(x.detach(), temperature).double().requires_grad_(True)
    logsm = torch.log_softmax(xr, dim=-1)
    p = logsm.exp()
    lp = logsm.gather(-1, t[:, None])[:, 0]
    h = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    (lp * g_logp.double() + h * g_ent.double()).sum().backward()
    return lp.detach(), h.detach(), xr.grad / temperature


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_entry_point_uses_logits_over_temperature(dtype):
    x0, t, g_logp, g_ent = _case(dtype)
    lp_ref, h_ref, grad_ref = _ref(x0, t, g_logp, g_ent, T)
    _, _, grad_ref_lp = _ref(x0, t, g_logp, torch.zeros(10), T)
    lp_raw, _, _ = _ref(x0, t, g_logp, g_ent, 1.0)
    assert (lp_ref - lp_raw).abs().max() > 0.1  # the temperature matters for this case
    rtol, atol = 1e-6, 2e-5

    for inplace in (False, True):
        logits = x0.clone().requires_grad_(True)
        lp, h = vocab_parallel_logprob(logits * 1, t, temperature=T, inplace_backward=inplace)
        (lp * g_logp + h * g_ent).sum().backward()
        torch.testing.assert_close(lp.double(), lp_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(h.double(), h_ref, rtol=rtol, atol=atol)
        assert_grad_close(logits.grad, grad_ref, dtype)

        for coef in (g_logp, lambda lp_: (g_logp * lp_).sum()):  # one fused pass / autograd on the log-probs
            logits = x0.clone().requires_grad_(True)
            loss, lp_f, h_f = fused_logprob_loss(logits * 1, t, coef, temperature=T, inplace=inplace)
            loss.backward()
            torch.testing.assert_close(lp_f.double(), lp_ref, rtol=rtol, atol=atol)
            torch.testing.assert_close(h_f.double(), h_ref, rtol=rtol, atol=atol)
            torch.testing.assert_close(loss.double(), (g_logp.double() * lp_f.double()).sum(), rtol=1e-5, atol=1e-4)
            assert_grad_close(logits.grad, grad_ref_lp, dtype)

    ref_lp, _ = logprob_reference(x0.float(), t, temperature=T)  # the pure-torch reference: fp32 x / T
    torch.testing.assert_close(ref_lp.double(), _ref(x0.float(), t, g_logp, g_ent, T)[0], rtol=rtol, atol=atol)


def test_not_inplace_leaves_the_logits_alone_and_temperature_one_is_the_raw_path():
    x0, t, g, _ = _case(torch.float32)
    x = x0.clone()
    vocab_parallel_logprob(x, t, temperature=T)
    fused_logprob_loss(x, t, g, temperature=T)
    assert torch.equal(x, x0)
    assert torch.equal(vocab_parallel_logprob(x, t, temperature=1.0)[0], vocab_parallel_logprob(x, t)[0])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            vocab_parallel_logprob(x, t, temperature=bad)
