"""The math the CUDA kernels run, exercised on the CPU.

tests/ops/math_header_check.cpp is compiled with g++ against csrc/aapo_math.h and csrc/cuda/kernel_math.h (no torch,
no CUDA). It replays each kernel's thread/warp decomposition with the same AAPO_HD functions the .cu files call.
Its results are compared with the CPU extension ops (torch.ops.aapo.*) and pure-torch formulas on the same inputs.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import aapo_megatron._C  # noqa: F401  (registers torch.ops.aapo)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "ops" / "math_header_check.cpp"
HEADERS = [ROOT / "csrc" / "aapo_math.h", ROOT / "csrc" / "cuda" / "kernel_math.h"]


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Path:
    """The compiled driver (g++ -Wall -Wextra -Werror, like the CUDA compile check)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.fail(f"a C++ compiler is needed to build {SOURCE.name}: {cxx!r} not found (set CXX)")
    exe = tmp_path_factory.mktemp("math_header") / "math_header_check"
    cmd = [cxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling {SOURCE.name} failed:\n{proc.stderr}"
    return exe


def _run(exe: Path, *args) -> None:
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _save(path: Path, t: torch.Tensor) -> Path:
    t.detach().contiguous().cpu().numpy().tofile(path)
    return path


def _load(path: Path, *shape, dtype=np.float32) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=dtype).reshape(shape))


# ------------------------------------------------------------------------------------------------ advantages


def _advantages_reference(R, w, R_ref, g, eps, scale, dlow, dhigh, pairing):
    """Pure-torch float64 grouped advantages (docs/algorithms.md)."""
    r = (R.double() * w.double()).nansum(dim=1)  # [B*G]; an all-NaN row sums to 0
    groups = r.view(-1, g)  # [B, G]
    mean = groups.mean(dim=1)
    std = groups.std(dim=1) if g > 1 else torch.full_like(mean, float("nan"))
    centred = groups - mean[:, None]
    base = centred / (std[:, None] + eps) if scale else centred
    adv, ref_sum = base, torch.zeros(0, dtype=torch.float64)
    if R_ref is not None:
        ref_sum = (R_ref.double() * w.double()).nansum(dim=1)
        ref = ref_sum.view(-1, g) if pairing == 0 else ref_sum.view(groups.size(0), -1).mean(dim=1, keepdim=True)
        adv = base + (groups - ref).clamp(min=-dlow, max=dhigh)
    zero_var = groups.amin(dim=1) == groups.amax(dim=1)
    return [t.float() for t in (r, ref_sum, adv.reshape(-1), base.reshape(-1), mean, std)] + [zero_var]


def _run_advantages(exe, tmp_path, R, w, R_ref, g, eps, scale, dlow, dhigh, pairing):
    n, f = R.shape
    m = 0 if R_ref is None else R_ref.size(0)
    b = n // g
    ref_file = _save(tmp_path / "ref.bin", R_ref if R_ref is not None else torch.zeros(0))
    out = tmp_path / "adv_out.bin"
    _run(exe, "advantages", n, f, m, g, int(scale), pairing, repr(eps), repr(dlow), repr(dhigh),
         _save(tmp_path / "r.bin", R), _save(tmp_path / "w.bin", w), ref_file, out)
    flat = torch.from_numpy(np.fromfile(out, dtype=np.float32))
    parts = list(torch.split(flat, [n, m, n, n, b, b, b]))
    parts[-1] = parts[-1] != 0
    return parts


def _rewards(n, f, seed, nan_frac=0.25, levels=None):
    gen = torch.Generator().manual_seed(seed)
    if levels is None:
        R = torch.randn(n, f, generator=gen)
    else:  # few distinct values, so some groups have zero variance
        R = torch.randint(0, levels, (n, f), generator=gen).float()
    R[torch.rand(n, f, generator=gen) < nan_frac] = float("nan")
    R[0] = float("nan")  # an all-NaN row (sums to 0)
    return R


ADVANTAGE_CASES = [
    # (B, G, F, ref rows per group or None, pairing, scale, levels)
    (6, 8, 3, 8, 0, True, None),
    (3, 40, 2, 40, 0, True, None),  # G > 32: lanes loop over several samples
    (5, 4, 1, 7, 1, True, 2),  # group_mean with G_ref != G; binary rewards -> zero-variance groups
    (4, 70, 3, 33, 1, False, None),  # no std scaling, G_ref > 32
    (7, 1, 2, 1, 0, False, None),  # G = 1 (std NaN), paired
    (9, 5, 4, None, 0, True, 3),  # no reference (GRPO / Dr. GRPO)
]


@pytest.mark.parametrize("b,g,f,gref,pairing,scale,levels", ADVANTAGE_CASES)
def test_grouped_advantages_warp_decomposition(checker, tmp_path, b, g, f, gref, pairing, scale, levels):
    R = _rewards(b * g, f, seed=b * 100 + g, levels=levels)
    if levels is not None:
        R[g : 2 * g] = 1.0  # group 1 has identical rewards
    w = torch.linspace(0.5, 1.5, f)
    R_ref = None if gref is None else _rewards(b * gref, f, seed=7 + g, levels=levels)
    args = (g, 1e-4, scale, 0.2, 0.28, pairing)
    got = _run_advantages(checker, tmp_path, R, w, R_ref, *args)
    cpu = torch.ops.aapo.grouped_advantages(R, w, R_ref, g, 1e-4, scale, 0.2, 0.28, pairing)
    ref = _advantages_reference(R, w, R_ref, g, 1e-4, scale, 0.2, 0.28, pairing)
    names = ["rewards", "ref_rewards", "advantages", "advantages_no_margin", "group_mean", "group_std", "zero_variance"]
    for name, x, c, r in zip(names, got, cpu, ref):
        if name == "zero_variance":
            assert torch.equal(x, c) and torch.equal(x, r), name
            continue
        # Double accumulation in another order: equal to the CPU kernel up to the float32 rounding of the output.
        torch.testing.assert_close(x, c, rtol=2e-7, atol=1e-7, equal_nan=True, msg=lambda s: f"{name} vs CPU op: {s}")
        torch.testing.assert_close(x, r, rtol=2e-7, atol=1e-7, equal_nan=True, msg=lambda s: f"{name} vs torch: {s}")
    if levels is not None:
        assert got[-1].any(), "the case was meant to contain zero-variance groups"
    if gref is not None:
        assert not torch.equal(got[2], got[3]), "the margin term changed nothing: the case does not test it"


def test_reward_sum_matches_cpu_op(checker, tmp_path):
    R = _rewards(37, 4, seed=3)
    w = torch.tensor([1.0, -0.5, 2.0, 0.25])
    out = tmp_path / "sum.bin"
    _run(checker, "reward_sum", 37, 4, _save(tmp_path / "r.bin", R), _save(tmp_path / "w.bin", w), out)
    got = _load(out, 37)
    assert math.isnan(got[0])  # all-NaN row: NaN, unlike the grouped op's 0
    torch.testing.assert_close(got, torch.ops.aapo.nan_weighted_reward_sum(R, w), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------ bf16 rounding


def test_bf16_rounding_matches_torch(checker, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-30, 30, (4000,), generator=gen),
        # exact ties (round to even both ways), values that round up to inf, specials
        torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895e38, -3.3895e38, 1e-40, -0.0]),
        torch.tensor([float("inf"), float("-inf"), float("nan")]),
    ]).float()
    out = tmp_path / "bf16.bin"
    _run(checker, "bf16_round", x.numel(), _save(tmp_path / "x.bin", x), out)
    got = torch.from_numpy(np.fromfile(out, dtype=np.int16))
    want = x.to(torch.bfloat16).view(torch.int16)
    finite = ~x.isnan()
    assert torch.equal(got[finite], want[finite])
    assert got[~finite].view(torch.bfloat16).isnan().all()


# ------------------------------------------------------------------------------------------------ log-prob


def _logits_rows(n, v, seed):
    """[n, v] float32 logits with the awkward rows a vocab shard meets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen) * 3.0
    x[1, -1] = 40.0  # the maximum in the very last element: the running max moves late
    x[2] += 1.0e4  # large common offset: sum_pd must stay relative to the max
    x[3, ::3] = float("-inf")  # masked vocabulary entries
    x[4, : v // 2] = -1.0e30  # huge negatives: exp underflows to 0 without NaN
    return x


def _buffer(x: torch.Tensor, dtype, stride, offset):
    """Flat buffer holding x's rows at offset + i*stride (so rows start misaligned), and the strided view."""
    n, v = x.shape
    flat = torch.full((offset + (n - 1) * stride + v,), 7.0, dtype=dtype)
    view = flat.as_strided((n, v), (stride, 1), offset)
    view.copy_(x)
    return flat, view


def _torch_logprob_entropy(x: torch.Tensor, target: torch.Tensor):
    """Pure-torch log p(target) [N] and entropy [N] over full-vocabulary rows (float64)."""
    lp = torch.log_softmax(x.double(), dim=-1)
    p = lp.exp()
    ent = -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)
    return lp.gather(1, target[:, None]).squeeze(1), ent


def _assert_grad_close(grad: torch.Tensor, want: torch.Tensor, dtype) -> None:
    """Gradient [N, V] vs an fp64 autograd reference, every row (including the one at +1e4: log p_j is formed as
    (x_j - max) - log sumexp, so the common offset cancels exactly)."""
    torch.testing.assert_close(grad, want, rtol=2e-4 if dtype == torch.float32 else 2**-7, atol=1e-5)


LOGPROB_CASES = [
    # (dtype, N, V, row stride, element offset of row 0, vocab_start, vocab_size)
    (torch.float32, 6, 1003, 1003, 0, 0, 1003),  # full vocabulary, rows drift out of 16-byte alignment
    (torch.float32, 6, 1000, 1007, 1, 1000, 3000),  # second TP shard of 3; strided, misaligned rows
    (torch.bfloat16, 6, 1024, 1024, 3, 0, 1024),  # bf16 rows all starting 6 bytes past a boundary
    (torch.bfloat16, 6, 517, 523, 5, 517, 1034),  # last shard of 2, odd sizes everywhere
    (torch.float32, 5, 7, 7, 0, 0, 7),  # a row shorter than one thread block's vectors
]


@pytest.mark.parametrize("dtype,n,v,stride,offset,vocab_start,vocab_size", LOGPROB_CASES)
def test_logprob_block_decomposition(checker, tmp_path, dtype, n, v, stride, offset, vocab_start, vocab_size):
    x32 = _logits_rows(n, v, seed=v)
    flat, x = _buffer(x32, dtype, stride, offset)
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, vocab_size, (n,), generator=gen)
    target[0] = vocab_start  # first element of the shard
    target[1] = vocab_start + v - 1  # last element of the shard
    target[2] = vocab_start + v // 2
    target[3] = vocab_start + 1  # row 3 masks every third entry with -inf; its target is a finite one
    if vocab_size > v:  # a row whose target lives on another rank
        target[-1] = (vocab_start + v) % vocab_size
    grad_logp = torch.randn(n, generator=gen)
    grad_ent = torch.randn(n, generator=gen)

    # Global (max, log sumexp) and H: from the full vocabulary when this is the only shard, else other finite values
    # (the backward takes them as inputs, so the formula is checked either way).
    xf = x.float()
    row_max = xf.amax(dim=-1) + (0.25 if vocab_size > v else 0.0)
    log_sumexp = torch.logsumexp(xf.double() - row_max.double()[:, None], dim=-1).float() + (
        0.5 if vocab_size > v else 0.0)
    entropy = torch.rand(n, generator=gen) + 1.0
    if vocab_size == v:
        entropy = _torch_logprob_entropy(xf, target)[1].float()

    outdir = tmp_path / "lp"
    outdir.mkdir()
    code = "f32" if dtype == torch.float32 else "bf16"
    _run(checker, "logprob", code, n, v, stride, offset, vocab_start, 1, _save(tmp_path / "x.bin", flat.view(
        torch.int16) if dtype == torch.bfloat16 else flat), _save(tmp_path / "t.bin", target),
        _save(tmp_path / "mx.bin", row_max), _save(tmp_path / "ls.bin", log_sumexp), _save(tmp_path / "h.bin", entropy),
        _save(tmp_path / "gl.bin", grad_logp), _save(tmp_path / "ge.bin", grad_ent), outdir)
    stats = _load(outdir / "stats.bin", n, 4)
    seq = _load(outdir / "seq_stats.bin", n, 3)

    # Forward stats vs the CPU op (same definition: relative to the shard max) and vs the header's scalar path.
    cpu_stats = torch.ops.aapo.logprob_shard_stats(x, target, vocab_start, vocab_size)
    assert torch.equal(stats[:, 0], cpu_stats[:, 0])  # max is exact
    assert torch.equal(stats[:, 3], cpu_stats[:, 3])  # target logit (or 0 off-shard) is exact
    torch.testing.assert_close(stats[:, 1:3], cpu_stats[:, 1:3], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(stats[:, :3], seq, rtol=2e-5, atol=2e-5)
    # ... and vs torch: log Z of the shard and the shard's entropy
    torch.testing.assert_close(stats[:, 0] + stats[:, 1].log(), torch.logsumexp(xf, dim=-1), rtol=1e-6, atol=1e-5)
    shard_ent = _torch_logprob_entropy(xf, torch.zeros(n, dtype=torch.long))[1].float()
    ent = stats[:, 1].log() - stats[:, 2] / stats[:, 1]
    torch.testing.assert_close(ent, shard_ent, rtol=1e-4, atol=1e-4)
    local = target - vocab_start
    in_shard = (local >= 0) & (local < v)
    assert in_shard.sum() >= 2 and (vocab_size == v or not in_shard.all())

    # Backward (with the entropy term) vs the CPU op, out of place and in place.
    grad = _load(outdir / "grad.bin", n, v)
    assert not grad.isnan().any(), "an element was not written by any simulated thread"
    cpu_grad = torch.full_like(x, float("nan"))
    torch.ops.aapo.logprob_shard_backward(x, target, vocab_start, vocab_size, row_max, log_sumexp, entropy, grad_logp,
                                          grad_ent, cpu_grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    # -inf logits: p = 0, so the exact gradient is 0 (here |grad_ent| > 1, where an unclamped shift would overflow
    # 0 * g_ent * shift to NaN). Checked exactly; the CPU op is compared on the other entries.
    masked = xf == float("-inf")
    assert masked.any() and (grad[masked] == 0).all()
    torch.testing.assert_close(grad[~masked], cpu_grad.float()[~masked], **tol)
    assert torch.equal(_load(outdir / "grad_inplace.bin", n, v), grad)

    # Backward vs autograd when this shard is the whole vocabulary.
    if vocab_size == v:
        xd = xf.double().requires_grad_(True)
        lp, h = _torch_logprob_entropy(xd, target)
        (grad_logp.double() * lp + grad_ent.double() * h).sum().backward()
        want = xd.grad.float()
        if dtype == torch.bfloat16:
            want = want.to(torch.bfloat16).float()
        _assert_grad_close(grad, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_backward_matches_cpu_op(checker, tmp_path, dtype):
    n, v, stride, offset = 6, 2051, 2053, 2
    x32 = _logits_rows(n, v, seed=5)
    flat, x = _buffer(x32, dtype, stride, offset)
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, v, (n,), generator=gen)
    target[0], target[1] = 0, v - 1
    grad_logp = torch.randn(n, generator=gen)
    zeros = torch.zeros(n)
    outdir = tmp_path / "fused"
    outdir.mkdir()
    code = "f32" if dtype == torch.float32 else "bf16"
    _run(checker, "logprob", code, n, v, stride, offset, 0, 0,
         _save(tmp_path / "x.bin", flat.view(torch.int16) if dtype == torch.bfloat16 else flat),
         _save(tmp_path / "t.bin", target), _save(tmp_path / "mx.bin", zeros), _save(tmp_path / "ls.bin", zeros),
         _save(tmp_path / "h.bin", zeros),
         _save(tmp_path / "gl.bin", grad_logp), _save(tmp_path / "ge.bin", zeros), outdir)
    stats = _load(outdir / "fused_stats.bin", n, 4)
    grad = _load(outdir / "fused_grad.bin", n, v)  # row kept in the cache (shared memory) between the passes
    assert torch.equal(_load(outdir / "fused_stats_nocache.bin", n, 4), stats)
    assert torch.equal(_load(outdir / "fused_grad_nocache.bin", n, v), grad)

    cpu_grad = torch.empty_like(x)
    cpu_stats = torch.ops.aapo.logprob_fused_fwd_bwd(x, target, grad_logp, cpu_grad)
    assert torch.equal(stats[:, [0, 3]], cpu_stats[:, [0, 3]])
    torch.testing.assert_close(stats[:, 1:3], cpu_stats[:, 1:3], rtol=2e-5, atol=2e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(grad, cpu_grad.float(), **tol)

    # log p(target) and its gradient vs torch autograd (fp64).
    xd = x.float().double().requires_grad_(True)
    lp, _ = _torch_logprob_entropy(xd, target)
    (grad_logp.double() * lp).sum().backward()
    logp = stats[:, 3] - (stats[:, 0] + stats[:, 1].log())
    torch.testing.assert_close(logp, lp.detach().float(), rtol=1e-5, atol=1e-4)
    want = xd.grad.float() if dtype == torch.float32 else xd.grad.float().to(torch.bfloat16).float()
    _assert_grad_close(grad, want, dtype)
