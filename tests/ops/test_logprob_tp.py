"""Tensor-parallel log-prob over real gloo processes: parity with Megatron-Core's vocab_parallel_cross_entropy
(TP=1 and TP=2) and with the full-vocabulary reference, with targets in either shard."""

import os

import pytest
import torch

from tests.distributed import run_ranks
from tests.ops.grad_check import assert_grad_close


def _case(seed, n, v, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen) * 5
    x[0, : v // 2] = float("-inf")  # rank 0's shard of row 0 is entirely masked (TP=2)
    x[1, v // 2 + 3] = 3e3  # dominant logit in the second shard
    x[2] -= 1e4  # large common offset
    t = torch.randint(0, v, (n,), generator=gen)
    t[0] = v - 1  # second shard
    t[1] = 5  # first shard
    t[3] = v // 2  # first element of the second shard
    t[4] = v // 2 - 1  # last element of the first shard
    g = torch.randn(n, generator=gen)
    return x.to(dtype), t, g


TEMPERATURE = 0.7


def _body(rank, world_size, tp):
    import torch.distributed as dist
    from megatron.core import parallel_state
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    return {name: _compare_one(rank, tp, group, getattr(torch, name)) for name in ("float32", "bfloat16")}


def _compare_one(rank, tp, group, dtype):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from aapo_megatron.ops import fused_logprob_loss, vocab_parallel_logprob

    s, b, v = 6, 2, 1000
    x, t, g = _case(0, s * b, v, dtype)
    shard = v // tp
    lo, hi = rank * shard, (rank + 1) * shard
    x_local = x[:, lo:hi].contiguous().view(s, b, shard)
    t = t.view(s, b)
    g = g.view(s, b)
    out = {}

    # Megatron: loss = -log p, makes its fp32 copy (or works in place on fp32 input; hence the clone)
    xm = x_local.clone().requires_grad_(True)
    loss_m = vocab_parallel_cross_entropy(xm, t)
    (loss_m * g).sum().backward()
    out["megatron_logp"] = -loss_m.detach()
    out["megatron_grad"] = xm.grad.float()

    for inplace in (False, True):
        leaf = x_local.clone().requires_grad_(True)
        lp, h = vocab_parallel_logprob(leaf * 1, t, tp_group=group, inplace_backward=inplace)
        (-lp * g).sum().backward()
        out[f"logp_{inplace}"] = lp.detach()
        out[f"entropy_{inplace}"] = h.detach()
        out[f"grad_{inplace}"] = leaf.grad.float()
    # gradient computed inside the forward, after the TP collectives (tensor and callable dL/dlogp)
    for kind, coef in (("tensor", -g), ("callable", lambda lp: (-lp * g).sum())):
        leaf = x_local.clone().requires_grad_(True)
        loss, _, _ = fused_logprob_loss(leaf * 1, t, coef, tp_group=group, inplace=True)
        loss.backward()
        out[f"fused_grad_{kind}"] = leaf.grad.float()
    # at the sampling temperature: log_softmax(x / T) over the full vocabulary, across the shards
    leaf = x_local.clone().requires_grad_(True)
    loss, lp, _ = fused_logprob_loss(leaf * 1, t, -g, tp_group=group, temperature=TEMPERATURE)
    loss.backward()
    out["temperature_logp"], out["temperature_grad"] = lp, leaf.grad.float()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_matches_megatron_vocab_parallel_cross_entropy(tp):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_ranks(_body, world_size=tp, args=(tp,))
    for dtype_name in ("float32", "bfloat16"):
        _check(tp, getattr(torch, dtype_name), [r[dtype_name] for r in results])


def _check(tp, dtype, results):
    x, t, g = _case(0, 12, 1000, dtype)
    xr = x.double().requires_grad_(True)
    logsm = torch.log_softmax(xr, -1)
    lp_ref = logsm.gather(1, t[:, None])[:, 0]
    p = logsm.exp()
    h_ref = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    (-lp_ref * g.double()).sum().backward()
    for rank, out in enumerate(results):
        shard = 1000 // tp
        grad_ref = xr.grad[:, rank * shard : (rank + 1) * shard].view(6, 2, shard)
        for inplace in (False, True):
            lp, h, grad = out[f"logp_{inplace}"], out[f"entropy_{inplace}"], out[f"grad_{inplace}"]
            # same values on every TP rank, equal to Megatron's and to the float64 reference
            torch.testing.assert_close(lp, out["megatron_logp"].float(), rtol=1e-6, atol=2e-5)
            torch.testing.assert_close(lp.double().view(-1), lp_ref.detach(), rtol=1e-6, atol=2e-5)
            torch.testing.assert_close(h.double().view(-1), h_ref.detach(), rtol=0, atol=2e-5)
            assert_grad_close(grad, out["megatron_grad"], dtype)
            assert_grad_close(grad, grad_ref, dtype)
        for kind in ("tensor", "callable"):
            assert_grad_close(out[f"fused_grad_{kind}"], grad_ref, dtype)
    xt = (torch.div(x, TEMPERATURE)).double().requires_grad_(True)  # x / T rounded in x's dtype, as the op does
    lp_t = torch.log_softmax(xt, -1).gather(1, t[:, None])[:, 0]
    (-lp_t * g.double()).sum().backward()
    for rank, out in enumerate(results):
        shard = 1000 // tp
        torch.testing.assert_close(out["temperature_logp"].double().view(-1), lp_t.detach(), rtol=1e-6, atol=2e-5)
        grad_t = xt.grad[:, rank * shard : (rank + 1) * shard].view(6, 2, shard) / TEMPERATURE
        assert_grad_close(out["temperature_grad"], grad_t, dtype)
    if tp == 2:
        torch.testing.assert_close(results[0]["logp_False"], results[1]["logp_False"], rtol=0, atol=0)
