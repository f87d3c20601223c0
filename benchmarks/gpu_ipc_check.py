"""CUDA IPC between two processes: a weight bucket shared by handle arrives intact, and how fast it is read.

The colocated weight sync hands vLLM's workers CUDA IPC handles of the trainer's buckets (no copy through
host memory, no NCCL rendezvous). This check does the same with torch's own reductions, the primitive under
vLLM's `ipc` weight-transfer engine: the parent fills a bucket on the GPU, sends only its handle through a pipe,
the child rebuilds the tensor from the handle, checksums it, writes a marker into it, and the parent sees the
marker in its own tensor. It prints one line per bucket size with the child's read bandwidth against a
device-to-device copy measured in the same run.

    python benchmarks/gpu_ipc_check.py [--mb 64 512]

Exit 0 when every bucket arrived intact, 1 otherwise, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import reduce_tensor


def _child(conn) -> None:
    """Rebuild each bucket from its handle, checksum it, time a read, and mark it for the parent."""
    torch.cuda.init()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        rebuild, args = msg
        bucket = rebuild(*args)  # the parent's memory, not a copy
        checksum = float(bucket.double().sum().item())
        out = torch.empty_like(bucket)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out.copy_(bucket)
        end.record()
        end.synchronize()
        bucket[0] = -12345.0
        torch.cuda.synchronize()
        conn.send((checksum, start.elapsed_time(end)))
        del bucket, out


def _copy_ms(src: torch.Tensor) -> float:
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[64, 512], help="bucket sizes in MB (fp32)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_ipc_check: no CUDA device", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,), daemon=True)
    proc.start()
    ok = True
    print(f"{'bucket MB':>10}{'intact':>8}{'marker':>8}{'child read GB/s':>17}{'local copy GB/s':>17}{'ratio':>7}")
    try:
        for mb in args.mb:
            n = mb * 1024 * 1024 // 4
            bucket = torch.arange(n, device="cuda", dtype=torch.float32).remainder_(977.0)  # [n]
            want = float(bucket.double().sum().item())
            parent.send(reduce_tensor(bucket))
            if not parent.poll(120):
                print(f"gpu_ipc_check: the child did not answer for the {mb} MB bucket within 120 s", file=sys.stderr)
                return 1
            got, child_ms = parent.recv()
            torch.cuda.synchronize()
            intact = got == want
            marked = float(bucket[0].item()) == -12345.0
            local_ms = _copy_ms(bucket)
            gb = 2 * bucket.numel() * 4 / 1e9  # read + write
            print(f"{mb:>10}{str(intact):>8}{str(marked):>8}{gb / child_ms * 1e3:>17.0f}{gb / local_ms * 1e3:>17.0f}"
                  f"{local_ms / child_ms:>7.2f}")
            ok = ok and intact and marked
            del bucket
    finally:
        parent.send(None)
        proc.join(30)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
