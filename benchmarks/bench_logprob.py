"""Fused vocab-parallel token log-prob: ours vs Megatron-Core's vocab_parallel_cross_entropy vs log_softmax+gather.

Times forward + backward (best of --iters interleaved rounds after a warm-up round), measures extra peak memory over the logits (peak RSS
above the resident set before the call; the process runs with MALLOC_MMAP_THRESHOLD_ so freed tensors leave the
RSS), and prints our achieved bandwidth next to a same-run clone() of the logits. All in one run:

    .venv/bin/python benchmarks/bench_logprob.py                  # N=4096, V=32768, fp32+bf16, TP=1+2
    .venv/bin/python benchmarks/bench_logprob.py --n 1024 --v 8192 --iters 3

TP=2 is emulated on one process: it times one rank's half-vocabulary shard [N, V/2] with all threads, then adds the
measured latency of the op's collectives on a real 2-process gloo group (ours: all-reduce MAX [N] + SUM [3, N];
Megatron: MAX [N] + SUM [N] + SUM [N]).

Bytes moved per fwd+bwd: ours = 3 x logits (read, read, write), fused = 2 x logits (read, write) at TP=1 and
3 x logits at TP=2 (its gradient pass must wait for the collectives);
clone = 2 x logits (read, write). clone() writes fresh pages (the allocator returns large blocks to the OS), so
a copy_() into a pre-allocated buffer is printed too; percentages are given against both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # make freed large tensors return to the OS (honest RSS peaks)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def extra_peak_bytes(fn) -> int:
    """Peak resident memory during fn() above the resident memory before it, bytes."""
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    before = _rss_kb("VmRSS:")
    fn()
    return max(0, _rss_kb("VmHWM:") - before) * 1024


def time_interleaved(fns: dict, setup, iters: int) -> dict:
    """Best (min) seconds of each fn(*setup()) over iters rounds after one warm-up round. The fns take turns within a
    round, and the minimum discards time lost to other processes on a shared machine. setup is not timed."""
    times = {name: [] for name in fns}
    for i in range(iters + 1):
        for name, fn in fns.items():
            args = setup()
            t0 = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t0
            del args
            if i:
                times[name].append(dt)
    return {name: min(ts) for name, ts in times.items()}


def _collective_body(rank, world, n, kind, iters, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BENCH_PORT"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a, b = torch.randn(n), torch.randn(3, n)
    times = []
    for _ in range(iters + 2):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(a, op=dist.ReduceOp.MAX)
        if kind == "ours":
            dist.all_reduce(b)
        else:
            dist.all_reduce(b[0])
            dist.all_reduce(b[1])
        times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put(statistics.median(times[2:]))
    dist.destroy_process_group()


def collective_seconds(n: int, kind: str, iters: int = 10) -> float:
    """Median latency of one op's TP collectives on a real 2-process gloo group, seconds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["BENCH_PORT"] = str(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_collective_body, args=(r, 2, n, kind, iters, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = q.get(timeout=120)
    for p in procs:
        p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="tokens (rows)")
    ap.add_argument("--v", type=int, default=32768, help="full vocabulary size")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tp", default="1,2")
    args = ap.parse_args()

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from aapo_megatron.ops import fused_logprob_loss, vocab_parallel_logprob

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)  # Megatron's op reads its global group

    n = args.n
    print(f"threads={torch.get_num_threads()}  N={n}  V={args.v}  best of {args.iters} interleaved rounds")
    coll = {}
    if "2" in args.tp.split(","):
        coll = {k: collective_seconds(n, k) for k in ("ours", "megatron")}
        print(f"TP=2 collectives (2-process gloo, added to TP=2 times): ours {coll['ours'] * 1e3:.2f} ms, "
              f"megatron {coll['megatron'] * 1e3:.2f} ms")
    gen = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for tp in (int(t) for t in args.tp.split(",")):
            v = args.v // tp
            base = (torch.randn(n, v, generator=gen) * 3).to(dtype)
            target = torch.randint(0, v, (n,), generator=gen)
            g = torch.randn(n, generator=gen)
            nbytes = base.numel() * base.element_size()

            def fresh():
                return (base.clone().requires_grad_(True),)

            def ours(x, inplace=True):
                lp, _ = vocab_parallel_logprob(x, target, inplace_backward=inplace)
                torch.autograd.backward((lp * g).sum(), inputs=[x])

            def ours_copy(x):
                ours(x, inplace=False)

            # At TP>1 the collectives sit between the statistics and the gradient, so the fused op runs its two-pass
            # route (stats, all-reduces, gradient pass); a callable dL/dlogp forces that route in the emulation too.
            dloss = g if tp == 1 else (lambda lp: (lp * g).sum())

            def ours_fused(x):
                loss, _, _ = fused_logprob_loss(x, target, dloss, inplace=True)
                torch.autograd.backward(loss, inputs=[x])

            def megatron(x):
                loss = vocab_parallel_cross_entropy(x.view(n, 1, v), target.view(n, 1))
                torch.autograd.backward((loss.view(n) * g).sum(), inputs=[x])

            def logsoftmax(x):
                lp = torch.log_softmax(x.float(), dim=-1).gather(1, target[:, None])[:, 0]
                torch.autograd.backward((lp * g).sum(), inputs=[x])

            def clone(x):
                x.detach().clone()

            warm = torch.empty_like(base)

            def copy_warm(x):
                warm.copy_(x.detach())

            extra_coll = {"ours": coll.get("ours", 0.0), "megatron": coll.get("megatron", 0.0)} if tp > 1 else {}
            rows = [
                ("ours (in-place bwd)", ours, 3, "ours"),
                ("ours (out-of-place bwd)", ours_copy, 3, "ours"),
                ("ours fused grad-in-fwd", ours_fused, 2 if tp == 1 else 3, "ours"),
                ("megatron vocab_parallel_ce", megatron, None, "megatron"),
                ("log_softmax+gather", logsoftmax, None, None),
            ]
            timed = time_interleaved(
                {"clone": clone, "copy": copy_warm, **{name: fn for name, fn, _, _ in rows}}, fresh, args.iters
            )
            t_clone, t_copy = timed["clone"], timed["copy"]
            clone_gbs = 2 * nbytes / t_clone / 1e9
            copy_gbs = 2 * nbytes / t_copy / 1e9
            print(f"\n== {dtype_name}  TP={tp}  logits [{n}, {v}] = {nbytes / 2**20:.0f} MiB"
                  + ("  (one rank's shard + measured collectives)" if tp > 1 else ""))
            print(f"   clone():                     {t_clone * 1e3:8.1f} ms   {clone_gbs:6.1f} GB/s (fresh pages: includes page faults)")
            print(f"   copy_() into a warm buffer:  {t_copy * 1e3:8.1f} ms   {copy_gbs:6.1f} GB/s")
            results = {}
            for name, fn, passes, ckind in rows:
                t = timed[name] + extra_coll.get(ckind, 0.0)
                x = fresh()[0]
                mem = extra_peak_bytes(lambda: fn(x))
                del x
                results[name] = t
                bw = passes * nbytes / t / 1e9 if passes else 0.0
                gbs = f"{bw:6.1f} GB/s = {bw / clone_gbs * 100:3.0f}% of clone, {bw / copy_gbs * 100:3.0f}% of warm copy_" if passes else ""
                print(f"   {name:28s} {t * 1e3:8.1f} ms   extra peak {mem / 2**20:7.1f} MiB "
                      f"({mem / nbytes * 100:5.1f}% of logits)  {gbs}")
            m = results["megatron vocab_parallel_ce"]
            ls = results["log_softmax+gather"]
            for name in ("ours (in-place bwd)", "ours fused grad-in-fwd"):
                print(f"   speed-up {name}: {m / results[name]:.2f}x vs megatron, {ls / results[name]:.2f}x vs log_softmax+gather")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
