"""Colocated engines time-share the devices with Megatron; one step's order, the same code on CPU and GPU:

    generate -> sleep -> train -> wake(weights) -> sync -> wake(kv_cache) -> generate

The engines enforce it (`rollout/sleep.py`); on CPU vLLM's sleep and wake_up are logged no-ops and the memory
hand-over (`gpu_memory.py`) does nothing. Engines that are None (other ranks) or remote (no-op sleep) pass.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from aapo_megatron.trainer.gpu_memory import release_training_memory, restore_training_memory


def before_generate(engines: Iterable[Optional[Any]]) -> None:
    """Wake every engine fully (a no-op for awake ones)."""
    for engine in engines:
        if engine is not None:
            engine.wake_up()


def after_generate(engines: Iterable[Optional[Any]], chunks: Optional[Iterable[Any]]) -> None:
    """Put the engines to sleep, then give Megatron its gradient buffers back for the train step."""
    for engine in engines:
        if engine is not None:
            engine.sleep()
    restore_training_memory(chunks)


def before_sync(policy: Optional[Any], chunks: Optional[Iterable[Any]]) -> None:
    """Release Megatron's gradient buffers, then wake the policy engine's weights for the sync."""
    release_training_memory(chunks)
    if policy is not None:
        policy.wake_up(["weights"])


def after_sync(policy: Optional[Any]) -> None:
    """Wake the policy engine's KV cache for the next generate."""
    if policy is not None:
        policy.wake_up(["kv_cache"])
