"""vLLM general plugin: vLLM runs `register()` in every one of its processes (entry point `vllm.general_plugins`).

On CPU it shortens how long vLLM's inter-process message queues keep spinning after their last message.
vLLM's engine-core and worker processes poll those queues with `sched_yield` for 1 s after each message
before they fall back to a blocking wait. On a GPU host that costs spare cores; on a CPU host the same cores
then run the Megatron train step, and measured on 2 cores, a 0.32 s matmul workload took 0.93 s when started
right after a generate call of two idle engines (`benchmarks/bench_rollout.py --skip-generate --skip-sync`
prints this check as "idle spin"). The spin window becomes `AAPO_VLLM_IDLE_SPIN_S` seconds (default 0.002:
back-to-back decode steps still find the queue hot, a finished call goes quiet almost at once).
Set AAPO_VLLM_IDLE_SPIN_S=1 to restore vLLM's behaviour; `VLLM_PLUGINS` can also exclude this plugin.
"""

from __future__ import annotations

import os

SPIN_ENV = "AAPO_VLLM_IDLE_SPIN_S"
DEFAULT_IDLE_SPIN_S = 0.002


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


def register() -> None:
    """Entry point: on CPU hosts only (GPU hosts keep vLLM's spin, which trades spare cores for latency)."""
    import torch

    if torch.cuda.is_available():
        return
    limit_idle_spin(idle_spin_seconds())
