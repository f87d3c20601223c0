"""Run a conversion as W worker processes over gloo, each owning one pipeline stage (a slice of the layers).

The parent holds no weights. Workers see no GPU (CUDA_VISIBLE_DEVICES="") and
are `spawn`ed (fresh interpreters), so the caller's entry point must sit under
``if __name__ == "__main__":``. An error in any worker is re-raised in the parent with its original type when it is a
`ConversionError` (so the CLI prints the same message), otherwise as a
`ConversionError` carrying the worker's traceback.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import traceback
from typing import Any, Callable, Sequence

from aapo_megatron.checkpoint.errors import ConversionError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MALLOC_MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation by mmap in a conversion worker (unless MALLOC_MMAP_THRESHOLD_ is set)."""


def _worker_env() -> dict[str, str]:
    """Environment variables set for the workers' start.

    CUDA_VISIBLE_DEVICES="": conversion is CPU work; hiding GPUs makes workers take the CPU code paths (local
    layer spec, gloo, no device memory) whatever machine they run on.
    MALLOC_MMAP_THRESHOLD_: glibc raises its mmap threshold to the size of each freed mmapped block (up to
    32 MiB), after which freed tensors stay in the heap and fragment it; a fixed 1 MiB threshold hands every
    converted tensor back to the OS when it is freed. On the 1 GB benchmark this took a worker's peak from a
    run-to-run 525-630 MiB down to a steady 504 MiB, and no slower.
    """
    return {"CUDA_VISIBLE_DEVICES": "",
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))}


def _worker_entry(rank: int, world: int, port: int, fn: Callable, args: Sequence[Any], threads: int, q) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads),
    )
    if os.environ.get("AAPO_CONVERT_VERBOSE", "0") != "1":
        # Megatron/torch warn about missing Apex/TE and deprecated ShardedTensor APIs on every import; hide them.
        import warnings

        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    try:
        import torch

        torch.set_num_threads(threads)
        result = fn(rank, world, *args)
        q.put((rank, True, result))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
            payload: Any = (exc, tb)
        except Exception:  # noqa: BLE001 - an unpicklable exception travels as text
            payload = (None, tb)
        q.put((rank, False, payload))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_workers(fn: Callable, world: int, args: Sequence[Any] = (), timeout_s: float = 24 * 3600.0) -> list[Any]:
    """Run fn(rank, world, *args) on `world` spawned processes (MASTER_ADDR/PORT/RANK/WORLD_SIZE set); per-rank results."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // world)
    procs = [
        ctx.Process(target=_worker_entry, args=(r, world, port, fn, tuple(args), threads, q)) for r in range(world)
    ]
    saved = {k: os.environ.get(k) for k in _worker_env()}
    os.environ.update(_worker_env())  # spawned children copy os.environ when they start
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    failure: tuple[int, Any] | None = None
    try:
        while len(results) < world and failure is None:
            try:
                rank, ok, payload = q.get(timeout=5.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    # a worker died without reporting (killed, out of memory): give the queue a last chance
                    try:
                        rank, ok, payload = q.get(timeout=2.0)
                    except queue_mod.Empty:
                        r, code = dead[0]
                        raise ConversionError(
                            f"conversion worker {r} exited with code {code} without reporting "
                            "(killed, or out of memory?)"
                        ) from None
                else:
                    timeout_s -= 5.0
                    if timeout_s <= 0:
                        raise ConversionError("conversion workers timed out") from None
                    continue
            if ok:
                results[rank] = payload
            else:
                failure = (rank, payload)
    finally:
        for p in procs:
            p.join(timeout=30 if failure is None else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        rank, (exc, tb) = failure
        if isinstance(exc, ConversionError):
            raise exc
        raise ConversionError(f"conversion worker {rank} failed:\n{tb}")
    return [results[r] for r in range(world)]
