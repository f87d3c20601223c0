"""vLLM general plugin: vLLM runs `register()` in every one of its processes (entry point `vllm.general_plugins`).

Everywhere it registers our `gloo` weight-transfer engine with vLLM's factory (rollout/transport/gloo.py), so
an engine built with `weight_transfer_config={"backend": "gloo"}` finds it in its worker processes.

On CPU hosts it also does two things.

Idle spin. It shortens how long vLLM's inter-process message queues keep spinning after their last message.
vLLM's engine-core and worker processes poll those queues with `sched_yield` for 1 s after each message
before they fall back to a blocking wait. On a GPU host that costs spare cores; on a CPU host the same cores
then run the Megatron train step, and measured on 2 cores, a 0.32 s matmul workload took 0.93 s when started
right after a generate call of two idle engines (`benchmarks/bench_rollout.py --skip-generate --skip-sync`
prints this check as "idle spin"). The spin window becomes `AAPO_VLLM_IDLE_SPIN_S` seconds (default 0.002:
back-to-back decode steps still find the queue hot, a finished call goes quiet almost at once).
Set AAPO_VLLM_IDLE_SPIN_S=1 to restore vLLM's behaviour.

Quick exit. vLLM's engine-core and worker processes end by running the interpreter's final garbage collection
over everything vLLM and torch imported: about 2 s per process on this CPU, after all of vLLM's own cleanup.
The engine core waits for its worker, and the client force-kills an engine core still alive 5 s after asking
it to stop, which leaks a shared-memory segment until the client exits. Closing one engine took 4.7-5.1 s. In
those child processes the heap is frozen at exit (`gc.freeze`, the last exit handler to run), so the final
collection has nothing to scan; the OS frees the memory. Closing took 1.4-1.5 s, with no kill
(`benchmarks/bench_rollout.py` prints both). AAPO_VLLM_QUICK_EXIT=0 turns this off.
With the heap frozen, nanobind extensions (triton's, which vLLM imports) find their objects still alive when
they are torn down, and each process printed a page of "nanobind: leaked ..." about memory the OS frees anyway.
So once the heap is frozen, the process's stderr goes to /dev/null: all that is left to print then is the
interpreter's own teardown.

`VLLM_PLUGINS` can exclude this plugin.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import sys

SPIN_ENV = "AAPO_VLLM_IDLE_SPIN_S"
DEFAULT_IDLE_SPIN_S = 0.002
QUICK_EXIT_ENV = "AAPO_VLLM_QUICK_EXIT"


def idle_spin_seconds() -> float:
    """The configured spin window, seconds; a clear error for a malformed value."""
    raw = os.environ.get(SPIN_ENV)
    if raw is None or raw == "":
        return DEFAULT_IDLE_SPIN_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SPIN_ENV} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{SPIN_ENV} must be >= 0 seconds, got {raw!r}")
    return value


def limit_idle_spin(spin_s: float) -> bool:
    """Cap the busy-wait window of vLLM's shared-memory queue readers at `spin_s`; False if vLLM lacks it."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return False
    original = getattr(SpinCondition.wait, "__wrapped__", SpinCondition.wait)

    def wait(self, timeout_ms=None):
        if getattr(self, "busy_loop_s", 0) > spin_s:
            self.busy_loop_s = spin_s
        return original(self, timeout_ms)

    wait.__wrapped__ = original
    SpinCondition.wait = wait
    return True


def quick_exit_enabled() -> bool:
    """AAPO_VLLM_QUICK_EXIT: 1 (default) or 0; a clear error for anything else."""
    raw = os.environ.get(QUICK_EXIT_ENV, "").strip()
    if raw in ("", "1"):
        return True
    if raw == "0":
        return False
    raise ValueError(f"{QUICK_EXIT_ENV} must be 0 or 1, got {raw!r}")


def freeze_heap_at_exit() -> bool:
    """In a child process (vLLM's engine core and workers; not the process that made the engine), freeze the
    heap when the interpreter exits so its final garbage collection skips it; returns whether it applies."""
    if multiprocessing.parent_process() is None:
        return False
    atexit.register(_freeze_heap)  # registered at plugin load: it runs after the handlers vLLM registers later
    return True


def _freeze_heap() -> None:
    """The last exit handler: freeze the heap, then mute the teardown (nanobind's leak report of frozen objects)."""
    gc.freeze()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams: nothing left to flush
            pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def register() -> None:
    """Entry point: registers the `gloo` weight-transfer engine; the rest on CPU hosts only (GPU hosts keep
    vLLM's spin, which trades spare cores for latency)."""
    from aapo_megatron.distributed import current_platform
    from aapo_megatron.rollout.transport.gloo import register_gloo_engine

    register_gloo_engine()
    if current_platform().cuda:
        return
    limit_idle_spin(idle_spin_seconds())
    if quick_exit_enabled():
        freeze_heap_at_exit()
