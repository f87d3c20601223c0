"""CUDA vocab-parallel log-prob kernels: achieved HBM bandwidth vs a device-to-device copy, in one run.

For logits [N, V] (bf16 and fp32) it times, with CUDA events (median of --iters after warm-up):
    copy          dst.copy_(logits)                          2 x logits bytes (read + write): the bandwidth yardstick
    stats         torch.ops.aapo.logprob_shard_stats         1 x (read)
    backward      torch.ops.aapo.logprob_shard_backward      2 x (read + write), in place over the logits
    fused         torch.ops.aapo.logprob_fused_fwd_bwd       2 x (read + write; the row is re-read from shared memory)
    ours fwd+bwd  vocab_parallel_logprob + backward          3 x (stats, then the in-place backward)
    megatron      vocab_parallel_cross_entropy fwd+bwd       (fp32 copy of bf16 logits, softmax kept for backward)
    log_softmax   log_softmax + gather fwd+bwd
and prints time, bytes moved, achieved GB/s and that bandwidth as a fraction of the copy's, plus peak extra memory
over the logits. Without a CUDA device it prints a notice and exits 0.

    python benchmarks/bench_logprob_gpu.py                         # N=8192, V=32768 and V=151936/8, bf16 + fp32
    python benchmarks/bench_logprob_gpu.py --n 4096 --v 128256 --dtypes bfloat16 --iters 50
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_ms(fn, setup, iters: int) -> float:
    """Median milliseconds of fn(*setup()) over iters runs after two warm-ups; setup is not timed."""
    times = []
    for i in range(iters + 2):
        args = setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
        del args
    return statistics.median(times)


def peak_extra_bytes(fn, setup) -> int:
    """Peak device memory allocated during fn(*setup()) above what was allocated before it."""
    args = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def init_megatron() -> bool:
    """One-rank NCCL group + Megatron model-parallel state (TP=1), so vocab_parallel_cross_entropy can run."""
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state
    except ImportError as exc:
        print(f"megatron-core not importable ({exc}); skipping the Megatron row")
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    return True


def bench_shape(n: int, v: int, dtype: torch.dtype, iters: int, with_megatron: bool) -> list[tuple]:
    """Rows (name, ms, bytes moved, peak extra bytes) for logits [n, v] of `dtype`."""
    from aapo_megatron.ops import vocab_parallel_logprob

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    base = (torch.randn(n, v, device=dev, generator=gen) * 3.0).to(dtype)  # [N, V]
    target = torch.randint(0, v, (n,), device=dev, generator=gen)
    coef = torch.randn(n, device=dev, generator=gen)
    row_max = base.float().amax(dim=-1)  # [N]
    log_sumexp = torch.logsumexp(base.float() - row_max[:, None], dim=-1)  # [N]
    entropy = torch.ones(n, device=dev)
    nbytes = base.numel() * base.element_size()
    scratch = torch.empty_like(base)
    rows = []

    def fresh():
        scratch.copy_(base)  # not timed: every timed call sees the same logits
        return (scratch,)

    def run(name, fn, setup, moved):
        ms = time_ms(fn, setup, iters)
        rows.append((name, ms, moved, peak_extra_bytes(fn, setup)))

    dst = torch.empty_like(base)
    run("copy", lambda x: dst.copy_(x), lambda: (base,), 2 * nbytes)
    run("stats", lambda x: torch.ops.aapo.logprob_shard_stats(x, target, 0, v), lambda: (base,), nbytes)
    run("backward (in place)",
        lambda x: torch.ops.aapo.logprob_shard_backward(x, target, 0, v, row_max, log_sumexp, entropy, coef, None, x),
        fresh,
        2 * nbytes)
    run("fused (in place)", lambda x: torch.ops.aapo.logprob_fused_fwd_bwd(x, target, coef, x), fresh, 2 * nbytes)

    def ours(x):
        x.requires_grad_(True)
        lp, _ = vocab_parallel_logprob(x, target, inplace_backward=True)
        (coef * lp).sum().backward()

    run("ours fwd+bwd", ours, lambda: (scratch.detach().copy_(base),), 3 * nbytes)

    def log_softmax_gather(x):
        x.requires_grad_(True)
        lp = torch.log_softmax(x.float(), dim=-1).gather(1, target[:, None])[:, 0]
        (coef * lp).sum().backward()

    run("log_softmax+gather", log_softmax_gather, lambda: (base.detach().clone(),), 0)

    if with_megatron:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def megatron(x):
            x.requires_grad_(True)
            loss = vocab_parallel_cross_entropy(x[:, None, :], target[:, None])  # [s, b, V] layout, -logp
            (-coef[:, None] * loss).sum().backward()

        run("megatron vocab_parallel_ce", megatron, lambda: (base.detach().clone(),), 0)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="rows (tokens)")
    ap.add_argument("--v", type=int, nargs="+", default=[32768, 151936 // 8], help="vocab shard sizes V/tp")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-megatron", action="store_true", help="skip Megatron's vocab_parallel_cross_entropy")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_logprob_gpu: skipped (no CUDA device)")
        return 0
    import aapo_megatron._C as ext

    if not ext.build_info()["cuda"]:
        print("bench_logprob_gpu: aapo_megatron._C was built without CUDA; rebuild on this machine (make build)",
              file=sys.stderr)
        return 1
    with_megatron = not args.no_megatron and init_megatron()
    print(f"device: {torch.cuda.get_device_name()}  N={args.n}  iters={args.iters}")
    for dtype_name in args.dtypes:
        for v in args.v:
            rows = bench_shape(args.n, v, getattr(torch, dtype_name), args.iters, with_megatron)
            copy_gbs = rows[0][2] / rows[0][1] / 1e6
            ours_ms = next(r[1] for r in rows if r[0] == "ours fwd+bwd")
            mb = args.n * v * torch.finfo(getattr(torch, dtype_name)).bits / 8 / 1e6
            print(f"\nlogits [{args.n}, {v}] {dtype_name}  ({mb:.0f} MB)")
            print(f"{'op':<28}{'ms':>9}{'GB moved':>10}{'GB/s':>9}{'of copy':>9}{'x ours':>8}{'extra MB':>10}")
            for name, ms, moved, extra in rows:
                gbs = moved / ms / 1e6 if moved else float("nan")
                frac = f"{gbs / copy_gbs:.2f}" if moved else "-"
                print(f"{name:<28}{ms:>9.3f}{moved / 1e9:>10.3f}{gbs:>9.0f}{frac:>9}{ms / ours_ms:>8.2f}"
                      f"{extra / 1e6:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
