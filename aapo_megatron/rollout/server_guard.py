"""What guards the rollout server's HTTP side: a bearer token on every route but /health, a bounded request
body (size and read time), and idle connections closed by uvicorn's keep-alive timer.

`RequestGuard` is a pure ASGI middleware, so it sees every route of vLLM's app (ours, vLLM's OpenAI routes,
/metrics, /docs) before any handler runs. It reads the whole body itself, within `max_body_bytes` and
`body_timeout_s`, and hands the handler a replay of it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable, Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

OPEN_PATHS = frozenset({"/health"})
"""Routes answered without a token (liveness probes)."""

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def send_json(send: Send, status: int, payload: dict[str, Any], close: bool = False) -> None:
    """Answer `payload` as JSON; close=True asks uvicorn to drop the connection afterwards."""
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: token check (401 missing, 403 wrong), 413 over `max_body_bytes`, 408 for a slow body."""

    def __init__(self, app: Any, token: Optional[str], max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout_s = float(body_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.token is not None and path not in OPEN_PATHS:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not header.startswith(b"Bearer "):
                return await send_json(send, 401, {"error": f"{path} requires 'Authorization: Bearer <token>'"})
            if not hmac.compare_digest(header[len(b"Bearer "):].strip(), self.token):
                return await send_json(send, 403, {"error": f"{path}: invalid bearer token"})
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_json(send, 400, {"error": f"bad Content-Length {length!r}"}, close=True)
            if declared > self.max_body_bytes:
                return await send_json(send, 413, self._too_big(declared), close=True)
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except asyncio.TimeoutError:
            return await send_json(send, 408, {"error": f"{path}: the request body did not arrive within "
                                                        f"{self.body_timeout_s:g} s (--body-timeout-s)"}, close=True)
        except _TooBig as exc:
            return await send_json(send, 413, self._too_big(exc.size), close=True)
        except _Disconnected:
            return None
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect message

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooBig(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_big(self, size: int) -> dict[str, str]:
        return {"error": f"request body of {size}+ bytes exceeds the limit of {self.max_body_bytes} bytes "
                         f"(--max-request-mb)"}


class _TooBig(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class _Disconnected(Exception):
    pass


class IdleClosingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with its keep-alive timer armed from the moment a connection opens.

    uvicorn arms `timeout_keep_alive` only after a response, so a connection that never sends a request would
    stay open forever; here it is closed after `timeout_keep_alive` seconds of silence too.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
