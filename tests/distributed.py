"""Run a function on N real processes over gloo (the distributed test harness).

    def _body(rank, world_size, tp):          # module level, so it pickles
        ...
        return some_picklable_result

    results = run_ranks(_body, world_size=2, args=(2,))   # [result_rank0, result_rank1]

Each rank is a fresh `spawn`ed interpreter with MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE/LOCAL_RANK set (what torchrun sets); the body initialises
torch.distributed itself (usually via aapo_megatron.distributed). An
exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any], env: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        result = fn(rank, world_size, *args)
        # Plain pickle (by value): the multiprocessing queue would share tensors through file
        # descriptors that die with this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(
    fn: Callable,
    world_size: int,
    args: Sequence[Any] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = 300.0,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned processes; return per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, tuple(args), dict(env or {}), queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout_s)
            except queue_module.Empty as exc:
                raise TimeoutError(
                    f"distributed test timed out after {timeout_s:.0f}s; finished ranks: {sorted(results)}"
                ) from exc
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=10 if not failures else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise RuntimeError("distributed test failed:\n" + "\n".join(failures))
    bad_exit = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (0, None, -9)]
    if bad_exit:
        raise RuntimeError(f"ranks exited abnormally: {bad_exit}")
    return [results[r] for r in range(world_size)]
