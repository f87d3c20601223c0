"""CUDA ops (csrc/cuda/) against the CPU ops, the pure-torch references and Megatron's vocab_parallel_cross_entropy.

Every test is marked `gpu` (tests/conftest.py skips them without a CUDA device). On a GPU machine, build the
extension there first (`make build`: setup.py builds the CUDA variant when torch has CUDA and nvcc exists), then run
`python -m pytest tests/gpu -q`. See docs/gpu.md.
"""

from __future__ import annotations

import os

import pytest
import torch

from aapo_megatron.ops import (
    combine_shard_stats,
    finalize_stats,
    fused_logprob_loss,
    grouped_advantages_reference,
    logprob_reference,
    shard_stats_reference,
    vocab_parallel_logprob,
)
from tests.distributed import run_ranks

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("AAPO_GPU_TEST_DEVICE", "cuda")  # "cpu" only to dry-run this module's logic without a GPU
CUDA_OPS = ["grouped_advantages", "nan_weighted_reward_sum", "logprob_shard_stats", "logprob_shard_backward",
            "logprob_fused_fwd_bwd"]


@pytest.fixture(scope="module", autouse=True)
def cuda_extension():
    """The extension must be the CUDA build, with every op registered for the CUDA dispatch key."""
    import aapo_megatron._C as ext

    if DEVICE == "cuda":
        assert ext.build_info()["cuda"], (
            "aapo_megatron._C was built without CUDA; rebuild it on this machine (make build) so setup.py "
            "compiles csrc/cuda (needs torch with CUDA and nvcc)"
        )
        for op in CUDA_OPS:
            has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"aapo::{op}", "CUDA")
            assert has_kernel, f"aapo::{op} has no CUDA kernel"
    return ext


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


# ------------------------------------------------------------------------------------------------ advantages


def _rewards(n: int, f: int, seed: int, levels=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(n, f, generator=gen) if levels is None else torch.randint(0, levels, (n, f), generator=gen).float()
    R[torch.rand(n, f, generator=gen) < 0.25] = float("nan")
    R[0] = float("nan")
    return R


@pytest.mark.parametrize(
    "b,g,f,gref,pairing,scale,levels",
    [
        (64, 8, 3, 8, "paired", True, None),
        (16, 40, 2, 40, "paired", True, 2),  # G > 32 lanes; binary rewards -> zero-variance groups
        (33, 16, 1, 5, "group_mean", True, None),  # B not a multiple of the 8 groups per block
        (7, 70, 3, 33, "group_mean", False, None),
        (9, 1, 2, 1, "paired", False, None),  # G = 1: std is NaN
        (1000, 16, 4, None, "paired", True, 3),  # no reference; many blocks
    ],
)
def test_grouped_advantages_cuda(b, g, f, gref, pairing, scale, levels):
    R = _rewards(b * g, f, seed=b + g, levels=levels)
    w = torch.linspace(0.5, 1.5, f)
    R_ref = None if gref is None else _rewards(b * gref, f, seed=b * g, levels=levels)
    code = {"paired": 0, "group_mean": 1}[pairing]
    args = (g, 1e-4, scale, 0.2, 0.28, code)
    got = torch.ops.aapo.grouped_advantages(_dev(R), _dev(w), None if R_ref is None else _dev(R_ref), *args)
    cpu = torch.ops.aapo.grouped_advantages(R, w, R_ref, *args)
    ref = grouped_advantages_reference(R, g, weights=w, ref_rewards=R_ref, scale=scale, pairing=pairing)
    ref_fields = [ref.rewards, ref.ref_rewards, ref.advantages, ref.advantages_no_margin, ref.group_mean,
                  ref.group_std, ref.zero_variance]
    for x, c, r in zip(got, cpu, ref_fields):
        assert x.device.type == DEVICE
        x = x.cpu()
        if x.dtype == torch.bool:
            assert torch.equal(x, c) and torch.equal(x, r)
        else:
            torch.testing.assert_close(x, c, rtol=2e-7, atol=1e-7, equal_nan=True)
            torch.testing.assert_close(x, r, rtol=2e-7, atol=1e-7, equal_nan=True)


def test_grouped_advantages_cuda_errors():
    R, w = _dev(torch.zeros(6, 2)), _dev(torch.ones(2))
    with pytest.raises(RuntimeError, match=r"number of samples 6 \(B\*G\) is not divisible by group_size G=4"):
        torch.ops.aapo.grouped_advantages(R, w, None, 4, 1e-4, True, 0.2, 0.28, 0)
    with pytest.raises(RuntimeError, match="paired reference needs one reference sample per policy sample: "
                                           "ref_rewards has 3 rows, rewards has 6"):
        torch.ops.aapo.grouped_advantages(R, w, _dev(torch.zeros(3, 2)), 3, 1e-4, True, 0.2, 0.28, 0)
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="weights must be a 1-D float32 CUDA tensor"):
            torch.ops.aapo.grouped_advantages(R, torch.ones(2), None, 3, 1e-4, True, 0.2, 0.28, 0)


def test_nan_weighted_reward_sum_cuda():
    R, w = _rewards(1000, 3, seed=1), torch.tensor([1.0, -2.0, 0.5])
    got = torch.ops.aapo.nan_weighted_reward_sum(_dev(R), _dev(w)).cpu()
    torch.testing.assert_close(got, torch.ops.aapo.nan_weighted_reward_sum(R, w), rtol=0, atol=0, equal_nan=True)
    assert got[0].isnan()


# ------------------------------------------------------------------------------------------------ log-prob


def _logits(n: int, v: int, seed: int) -> torch.Tensor:
    """[n, v] float32 logits with a late maximum, a +1e4 offset row, masked (-inf) entries and huge negatives."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen) * 3.0
    x[1, -1] = 40.0
    x[2] += 1.0e4
    x[3, ::3] = float("-inf")
    x[4, : v // 2] = -1.0e30
    return x


def _strided(x: torch.Tensor, dtype, stride: int, offset: int) -> torch.Tensor:
    """x's values as a [n, v] view with row stride `stride` at element `offset` of a flat device buffer."""
    n, v = x.shape
    flat = torch.full((offset + (n - 1) * stride + v,), 7.0, dtype=dtype, device=DEVICE)
    view = flat.as_strided((n, v), (stride, 1), offset)
    view.copy_(x.to(dtype))
    return view


def _targets(n: int, vocab_start: int, v: int, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab_size, (n,), generator=gen)
    t[0], t[1], t[2], t[3] = vocab_start, vocab_start + v - 1, vocab_start + v // 2, vocab_start + 1
    if vocab_size > v:
        t[-1] = (vocab_start + v) % vocab_size  # on another shard
    return t


LAYOUTS = [
    # (dtype, N, V/tp, row stride, offset, vocab_start, vocab_size)
    (torch.float32, 64, 32000, 32000, 0, 0, 32000),
    (torch.bfloat16, 64, 32000, 32000, 0, 0, 32000),
    (torch.bfloat16, 32, 37984, 37984, 3, 37984, 151936),  # Qwen2 vocab at TP=4, rows 6 bytes off 16-byte
    (torch.float32, 16, 1003, 1007, 1, 1003, 3009),  # odd sizes, strided rows
    (torch.bfloat16, 8, 7, 9, 5, 0, 7),  # rows shorter than one vector per thread
]


@pytest.mark.parametrize("dtype,n,v,stride,offset,vocab_start,vocab_size", LAYOUTS)
def test_shard_stats_cuda(dtype, n, v, stride, offset, vocab_start, vocab_size):
    x = _strided(_logits(n, v, seed=v), dtype, stride, offset)
    target = _targets(n, vocab_start, v, vocab_size, seed=n)
    got = torch.ops.aapo.logprob_shard_stats(x, _dev(target), vocab_start, vocab_size).cpu()
    cpu = torch.ops.aapo.logprob_shard_stats(x.cpu(), target, vocab_start, vocab_size)
    ref = shard_stats_reference(x.cpu(), target, vocab_start)
    assert torch.equal(got[:, [0, 3]], cpu[:, [0, 3]])  # max and target logit are exact
    for other in (cpu, ref):
        torch.testing.assert_close(got[:, 1:3], other[:, 1:3], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype,n,v,stride,offset,vocab_start,vocab_size", LAYOUTS)
def test_shard_backward_cuda(dtype, n, v, stride, offset, vocab_start, vocab_size):
    x = _strided(_logits(n, v, seed=v), dtype, stride, offset)
    target = _targets(n, vocab_start, v, vocab_size, seed=n)
    gen = torch.Generator().manual_seed(3)
    xf = x.cpu().float()
    shift = 0.5 if vocab_size > v else 0.0  # another shard holds more of the mass
    row_max = xf.amax(dim=-1) + shift
    log_sumexp = torch.logsumexp(xf.double() - row_max.double()[:, None], dim=-1).float() + shift
    entropy = torch.rand(n, generator=gen) + 1.0
    grad_logp, grad_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 3.0
    args = (vocab_start, vocab_size, _dev(row_max), _dev(log_sumexp), _dev(entropy), _dev(grad_logp), _dev(grad_ent))

    out = torch.full_like(x, float("nan"))
    torch.ops.aapo.logprob_shard_backward(x, _dev(target), *args, out)
    inplace = x.clone()
    torch.ops.aapo.logprob_shard_backward(inplace, _dev(target), *args, inplace)
    assert torch.equal(inplace, out), "the in-place backward differs from the out-of-place one"
    got = out.cpu().float()
    assert not got.isnan().any()

    # Formula check in fp64: d(g_l * log p_t + g_e * H)/dx_j with log p_j = (x_j - max) - log sumexp, H given.
    xd = x.cpu().double()
    lp = (xd - row_max.double()[:, None]) - log_sumexp.double()[:, None]
    p = lp.exp()
    lp = torch.where(p > 0, lp, torch.zeros_like(lp))
    want = -p * (grad_logp.double()[:, None] + grad_ent.double()[:, None] * (lp + entropy.double()[:, None]))
    local = target - vocab_start
    rows = ((local >= 0) & (local < v)).nonzero()[:, 0]
    want[rows, local[rows]] += grad_logp.double()[rows]
    want = want.float().to(dtype).float()
    torch.testing.assert_close(got, want, rtol=2e-4 if dtype == torch.float32 else 2**-7, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_autograd_wrappers_dispatch_to_cuda(dtype, inplace):
    """A's wrappers (aapo_megatron.ops) on CUDA tensors: log-prob, entropy and gradients vs the torch reference."""
    n, v = 48, 32000
    x32 = _logits(n, v, seed=11)
    target = _targets(n, 0, v, v, seed=1)
    gen = torch.Generator().manual_seed(4)
    c_logp, c_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    xr = x32.to(dtype).float().double().requires_grad_(True)
    ref_lp, ref_ent = logprob_reference(xr, target)
    (c_logp.double() * ref_lp + c_ent.double() * ref_ent).sum().backward()

    x = _dev(x32.to(dtype)).requires_grad_(True)
    leaf = x.clone() if inplace else x  # the in-place backward overwrites its input buffer
    lp, ent = vocab_parallel_logprob(leaf, _dev(target), inplace_backward=inplace)
    assert lp.device.type == DEVICE
    (_dev(c_logp) * lp + _dev(c_ent) * ent).sum().backward()
    torch.testing.assert_close(lp.detach().cpu(), ref_lp.detach().float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.detach().cpu(), ref_ent.detach().float(), rtol=1e-4, atol=1e-4)
    want = xr.grad.float().to(dtype).float()
    torch.testing.assert_close(x.grad.cpu().float(), want, rtol=2e-4 if dtype == torch.float32 else 2**-7, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fwd_bwd_cuda(dtype):
    n, v = 64, 32000
    x32 = _logits(n, v, seed=12)
    target = _targets(n, 0, v, v, seed=2)
    coef = torch.randn(n, generator=torch.Generator().manual_seed(5))
    x = _dev(x32.to(dtype))
    grad = torch.empty_like(x)
    stats = torch.ops.aapo.logprob_fused_fwd_bwd(x, _dev(target), _dev(coef), grad)
    inplace = x.clone()
    stats2 = torch.ops.aapo.logprob_fused_fwd_bwd(inplace, _dev(target), _dev(coef), inplace)
    assert torch.equal(stats, stats2) and torch.equal(inplace, grad)

    cpu_grad = torch.empty_like(x.cpu())
    cpu_stats = torch.ops.aapo.logprob_fused_fwd_bwd(x.cpu(), target, coef, cpu_grad)
    assert torch.equal(stats.cpu()[:, [0, 3]], cpu_stats[:, [0, 3]])
    torch.testing.assert_close(stats.cpu()[:, 1:3], cpu_stats[:, 1:3], rtol=2e-5, atol=2e-5)

    xr = x.cpu().double().requires_grad_(True)
    ref_lp, _ = logprob_reference(xr, target)
    (coef.double() * ref_lp).sum().backward()
    logp = finalize_stats(stats.cpu())[0]
    torch.testing.assert_close(logp, ref_lp.detach().float(), rtol=1e-5, atol=1e-4)
    rtol = 2e-4 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(grad.cpu().float(), xr.grad.float().to(dtype).float(), rtol=rtol, atol=1e-5)

    loss, lp, _ = fused_logprob_loss(x.clone().requires_grad_(True), _dev(target), _dev(coef))
    torch.testing.assert_close(lp.cpu(), logp, rtol=0, atol=0)
    torch.testing.assert_close(loss.cpu(), (coef.double() * logp.double()).sum().float(), rtol=1e-6, atol=1e-5)


def test_tp_shards_combine_to_full_vocabulary():
    """Four vocab shards through the CUDA stats kernel, combined as the TP all-reduces do, equal the full row."""
    n, v, tp = 32, 151936, 4
    x = _dev(_logits(n, v, seed=13).to(torch.bfloat16))
    target = _targets(n, 0, v, v, seed=3)
    shard = v // tp
    parts = [torch.ops.aapo.logprob_shard_stats(x[:, r * shard:(r + 1) * shard], _dev(target), r * shard, v).cpu()
             for r in range(tp)]
    # combine_shard_stats's arithmetic with the all-reduces done by hand over the list of shards.
    gmax = torch.stack([p[:, 0] for p in parts]).amax(0)
    packed = 0
    for p in parts:
        delta = p[:, 0] - gmax
        s = torch.exp(delta)
        packed = packed + torch.stack([s * p[:, 1], s * (p[:, 2] + delta.clamp(min=-3.4e38) * p[:, 1]), p[:, 3]])
    logp, ent = finalize_stats(torch.stack([gmax, packed[0], packed[1], packed[2]], dim=1))[:2]
    full = combine_shard_stats(torch.ops.aapo.logprob_shard_stats(x, _dev(target), 0, v).cpu(), None)
    ref_lp, ref_ent = logprob_reference(x.cpu().double(), target)
    torch.testing.assert_close(logp, ref_lp.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logp, finalize_stats(full)[0], rtol=1e-5, atol=1e-4)


def test_logprob_cuda_errors():
    x = _dev(torch.zeros(4, 100))
    bad_target = r"logprob_shard_stats: target\[2\] = 100 is outside the vocabulary \[0, 100\)"
    with pytest.raises(RuntimeError, match=bad_target):
        torch.ops.aapo.logprob_shard_stats(x, _dev(torch.tensor([0, 1, 100, 3])), 0, 100)
    with pytest.raises(RuntimeError, match="logprob_shard_stats: target must be int64, got Int"):
        torch.ops.aapo.logprob_shard_stats(x, _dev(torch.tensor([0, 1, 2, 3], dtype=torch.int32)), 0, 100)
    with pytest.raises(RuntimeError, match=r"logprob_shard_stats: shard \[50, 150\) does not fit"):
        torch.ops.aapo.logprob_shard_stats(x, _dev(torch.zeros(4, dtype=torch.long)), 50, 120)
    with pytest.raises(RuntimeError, match="logits must be float32 or bfloat16, got Half"):
        torch.ops.aapo.logprob_shard_stats(x.half(), _dev(torch.zeros(4, dtype=torch.long)), 0, 100)
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="target must be on the logits' device"):
            torch.ops.aapo.logprob_shard_stats(x, torch.zeros(4, dtype=torch.long), 0, 100)
        with pytest.raises(RuntimeError, match="grad_out must match logits"):
            torch.ops.aapo.logprob_fused_fwd_bwd(x, _dev(torch.zeros(4, dtype=torch.long)), _dev(torch.ones(4)),
                                                 torch.empty(4, 100))


# ------------------------------------------------------------------------------------------------ vs Megatron


def _megatron_parity(rank: int, world_size: int, device: str, dtype_name: str) -> dict:
    """On each TP rank: Megatron's vocab_parallel_cross_entropy vs vocab_parallel_logprob on the same shard."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl")
    else:
        from aapo_megatron.compat.megatron_cpu import install_cpu_shims

        install_cpu_shims()
        dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        dtype = getattr(torch, dtype_name)
        s, b, v = 64, 4, 32000  # Megatron's layout [s, b, V]
        gen = torch.Generator().manual_seed(0)
        full = (torch.randn(s, b, v, generator=gen) * 3.0).to(dtype)
        target = torch.randint(0, v, (s, b), generator=gen)
        coef = torch.randn(s, b, generator=gen)
        shard = v // world_size
        local = full[..., rank * shard:(rank + 1) * shard].contiguous().to(device)
        tgt = target.to(device)

        ref_in = local.float().clone().requires_grad_(True)  # Megatron's op works on (and modifies) fp32 logits
        loss = vocab_parallel_cross_entropy(ref_in.clone(), tgt)  # [s, b] = -log p(target); modifies its input
        (-(coef.to(device)) * loss).sum().backward()  # d(sum coef * logp)

        ours_in = local.clone().requires_grad_(True)
        group = parallel_state.get_tensor_model_parallel_group()
        logp, _ = vocab_parallel_logprob(ours_in, tgt, tp_group=group)
        (coef.to(device) * logp).sum().backward()
        return {
            "megatron_logp": (-loss).detach().cpu(),
            "logp": logp.detach().cpu(),
            "megatron_grad": ref_in.grad.cpu(),
            "grad": ours_in.grad.float().cpu(),
        }
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_matches_megatron_vocab_parallel_cross_entropy(tp, dtype_name):
    if DEVICE == "cuda" and torch.cuda.device_count() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs, found {torch.cuda.device_count()}")
    results = run_ranks(_megatron_parity, world_size=tp, args=(DEVICE, dtype_name), env={"OMP_NUM_THREADS": "1"})
    for r in results:
        torch.testing.assert_close(r["logp"], r["megatron_logp"], rtol=1e-5, atol=1e-4)
        # Megatron computes the gradient from its fp32 copy; ours is rounded to the logits' dtype.
        rtol = 1e-4 if dtype_name == "float32" else 2**-7
        want = r["megatron_grad"].to(getattr(torch, dtype_name)).float()
        torch.testing.assert_close(r["grad"], want, rtol=rtol, atol=1e-6)
