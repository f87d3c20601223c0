"""Trainer side of a rollout server's weight-update session (`/update_weights`), for every transport.

`ServerSession` is one session: `begin` (waiting out a live trainer's session until the server's takeover
timeout), heartbeats on a side thread while it is open, one `call` per action. `HttpSyncClient` speaks vLLM's
weight-sync client protocol (init/start/update/finish, the surface `BroadcastTransport` drives) over such
sessions, so `gloo` (and `nccl`) reach a server on another host exactly as they reach an in-process engine.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

Request = Callable[[dict], dict]
"""POSTs one /update_weights body and returns the answer; raises an error whose text holds 'HTTP <status>'."""


class ServerSession:
    """One update session on a rollout server (begin, heartbeats, calls, close)."""

    def __init__(self, post: Request, heartbeat_interval_s: float, takeover_timeout_s: float):
        self.post = post
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self.takeover_timeout_s = float(takeover_timeout_s)
        self.id: Optional[str] = None
        self._stop = threading.Event()

    @property
    def open(self) -> bool:
        """Whether a session is open."""
        return self.id is not None

    def begin(self, **fields: Any) -> dict[str, Any]:
        """Open a session (a dead trainer's is taken over once silent for takeover_timeout_s); starts heartbeats."""
        deadline = time.monotonic() + self.takeover_timeout_s + 2 * self.heartbeat_interval_s
        while True:
            try:
                out = self.post({"action": "begin", **fields})
                break
            except Exception as exc:  # noqa: BLE001 - only a busy server (409) is retried
                if "HTTP 409" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(self.heartbeat_interval_s)
        self.id = out["session"]
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self.id, self._stop), name="aapo-update-heartbeat",
                         daemon=True).start()
        return out

    def _heartbeat(self, session: str, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_interval_s):
            try:
                self.post({"action": "heartbeat", "session": session})
            except Exception:  # noqa: BLE001 - the next call reports the session's fate
                return

    def call(self, action: str, **fields: Any) -> dict[str, Any]:
        """One action of the open session."""
        if self.id is None:
            raise RuntimeError(f"update_weights {action}: no open session")
        return self.post({"action": action, "session": self.id, **fields})

    def close(self) -> None:
        """Stop the heartbeats and forget the session (the server closed it, or will take it over)."""
        self._stop.set()
        self.id = None


class HttpSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over a rollout server's update sessions (broadcast transports).

    The group outlives the sessions: `init_weight_transfer_engine` runs once (in a session of its own making
    when none is open); each sync is then one session, `start_weight_update` .. `finish_weight_update`, which
    commits `version`. `abort_weight_update` ends a failed one (the server keeps its old weights).
    """

    def __init__(self, session: ServerSession, transport: str, num_workers: int):
        self.session = session
        self.transport = transport
        self.num_workers = int(num_workers)
        self.version: Optional[int] = None
        """The weight version the next finish commits (None: the server's next)."""
        self.result: dict[str, Any] = {}
        """The server's answer to the last commit ({'weight_version': n})."""

    def _ensure_session(self) -> None:
        if not self.session.open:
            self.session.begin(transport=self.transport)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """The server's workers join the trainer's group (blocks until rank 0 joined too)."""
        self._ensure_session()
        self.session.call("init", **{k: init_info[k] for k in ("master_address", "master_port", "world_size",
                                                                 "rank_offset")})

    def start_weight_update(self) -> None:
        """Open this sync's session (the init's, on the first sync)."""
        self._ensure_session()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """The server's workers receive one bucket (the trainer broadcasts it meanwhile)."""
        self.session.call("update", **update_info)

    def finish_weight_update(self, weight_version: Optional[int] = None) -> None:
        """Commit: the server loads the staged update (refused unless complete) and serves `version`."""
        version = self.version if weight_version is None else weight_version
        try:
            self.result = self.session.call("commit", version=version)
        finally:
            self.session.close()

    def abort_weight_update(self) -> None:
        """End a failed sync's session; the server keeps serving its old weights."""
        if not self.session.open:
            return
        try:
            self.session.call("abort")
        finally:
            self.session.close()

    def shutdown_weight_transfer_engine(self) -> None:
        """Nothing to tell the server: its workers leave this group when the next trainer's init replaces it."""
        self.abort_weight_update()


def local_address_toward(url: str) -> str:
    """This host's IP address on the route to `url`'s host (where a server's workers reach this process)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url if "//" in url else "//" + url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)  # UDP: picks the route and source address, sends nothing
        return s.getsockname()[0]
