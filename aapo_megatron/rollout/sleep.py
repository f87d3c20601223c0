"""The sleep state machine of a colocated engine that time-shares its GPUs with Megatron.

One step's order (`trainer/timeshare.py` drives it, the same code on CPU, where vLLM's sleep is a no-op):
generate -> sleep -> train -> wake(weights) -> sync -> wake(kv_cache) -> generate.

    awake --sleep--> asleep --wake(weights)--> weights --wake(kv_cache)--> awake

`generate` needs the engine awake (weights and KV cache), `update_weights` needs the weights awake; anything
else raises `RolloutError` naming the state and the call that would fix it. Every transition and checked call
is appended to `log`, which tests read to check the order.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

from aapo_megatron.rollout.engine import RolloutError

TAGS = ("weights", "kv_cache")
"""vLLM's wake_up tags for the memory it releases."""

LOG_LENGTH = 64
"""Events kept in `EngineSleep.log`."""


class EngineSleep:
    """Which of an engine's weights and KV cache are resident; checks each call against it."""

    def __init__(self, role: str):
        self.role = role
        self.asleep: set[str] = set()
        self.log: deque[str] = deque(maxlen=LOG_LENGTH)

    @property
    def state(self) -> str:
        """'awake', 'asleep' or 'weights' (weights resident, KV cache not)."""
        if not self.asleep:
            return "awake"
        return "asleep" if "weights" in self.asleep else "weights"

    @property
    def kv_awake(self) -> bool:
        """Whether the KV cache is resident."""
        return "kv_cache" not in self.asleep

    def record(self, event: str) -> None:
        """Append an event to the log."""
        self.log.append(event)

    def check(self, call: str) -> None:
        """Raise RolloutError unless `call` ('generate' or 'update_weights') may run now; logs it."""
        need = set(TAGS) if call == "generate" else {"weights"}
        missing = sorted(need & self.asleep)
        if missing:
            fix = " then ".join(f"wake_up(['{t}'])" for t in TAGS if t in missing)
            raise RolloutError(f"{self.role} engine is {self.state} ({', '.join(missing)} released): {call} "
                               f"needs {' and '.join(sorted(need))} resident; call {fix} first")
        if call == "generate":
            self.record("generate")

    def sleep(self) -> bool:
        """Mark everything released; False when already asleep (nothing to do)."""
        if self.asleep == set(TAGS):
            return False
        self.asleep = set(TAGS)
        self.record("sleep")
        return True

    def wake(self, tags: Optional[Sequence[str]]) -> list[str]:
        """Mark `tags` (None = all) resident; returns those that were asleep, in wake order (weights first)."""
        wanted = list(TAGS) if tags is None else list(tags)
        unknown = [t for t in wanted if t not in TAGS]
        if unknown:
            raise ValueError(f"wake_up tags must be among {TAGS}, got {unknown}")
        if "kv_cache" in wanted and "weights" not in wanted and "weights" in self.asleep:
            raise RolloutError(f"{self.role} engine: wake_up(['kv_cache']) while its weights are released; "
                               f"call wake_up(['weights']) first")
        todo = [t for t in TAGS if t in wanted and t in self.asleep]
        for t in todo:
            self.asleep.discard(t)
        if todo:
            self.record("wake:" + "+".join(todo))
        return todo
