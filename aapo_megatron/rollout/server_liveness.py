"""The rollout server's engine liveness: what /health and /generate say once vLLM's engine process is dead,
and when the server then exits.

vLLM's own app stops its HTTP server at the next 5 s watchdog tick after the engine dies, and exits 0: a
probe may never see the death, and a supervisor (Slurm, systemd) sees a clean exit. `aapo-rollout-server`
turns that off (VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1) and runs `EngineWatch` instead: from the moment the engine
is known dead, /health answers 503 and every generate 503 naming the cause, for --dead-engine-exit-s
seconds, then the server stops and exits 1.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from aapo_megatron.errors import EXIT_ERROR

log = logging.getLogger("aapo.rollout.server")

POLL_S = 0.2
"""How often the watch looks at the engine, seconds."""


def engine_dead(engine_client: Any) -> bool:
    """Whether vLLM's async engine client knows its engine-core process dead (or its output loop stopped)."""
    return bool(getattr(engine_client, "errored", False))


class EngineWatch:
    """Notices the engine's death, says so (`message`), and stops uvicorn `exit_after_s` seconds later."""

    def __init__(self, role: str, exit_after_s: float):
        self.role = role
        self.exit_after_s = float(exit_after_s)
        self.dead_since: Optional[float] = None
        """Event-loop time the death was first seen (None while the engine runs)."""
        self.exit_code = 0
        """What the server exits with: 1 once it stopped because its engine died."""

    def message(self) -> str:
        """The error /health and /generate give while the engine is dead."""
        return (f"the {self.role} engine process is dead (killed, or out of memory: see this server's log); "
                f"this server exits with code {EXIT_ERROR} within {self.exit_after_s:g} s (--dead-engine-exit-s); "
                f"restart it")

    def check(self, engine_client: Any) -> Optional[str]:
        """None while the engine runs; else the death `message` (the death time is recorded on the first call)."""
        if not engine_dead(engine_client):
            return None
        if self.dead_since is None:
            self.dead_since = asyncio.get_running_loop().time()
            log.error("%s", self.message())
        return self.message()

    async def run(self, app: Any, engine_client: Any) -> None:
        """Until cancelled: poll the engine; `exit_after_s` after its death, stop the server (`app.state.server`)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(POLL_S)
            if self.check(engine_client) is None or loop.time() - self.dead_since < self.exit_after_s:
                continue
            server = getattr(app.state, "server", None)
            if server is not None:
                log.error("stopping: the %s engine process died %.0f s ago", self.role, loop.time() - self.dead_since)
                self.exit_code = EXIT_ERROR
                server.should_exit = True
                return
