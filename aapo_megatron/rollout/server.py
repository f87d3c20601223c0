"""`aapo-rollout-server`: one vLLM rollout engine behind a small HTTP API (disaggregated runs).

    AAPO_ROLLOUT_TOKEN=secret aapo-rollout-server --model /ckpt/hf --port 8100          # policy
    aapo-rollout-server --model /ckpt/hf --role reference --port 8101                    # frozen reference

Endpoints (JSON in, JSON out):
    GET  /health          {"status": "ok" | "updating" | "incomplete", "weight_version": v}
    GET  /version         {"weight_version": v, "role": ..., "model": ..., "dtype": ..., "vocab_size": ...}
    POST /generate        {"prompts": [[ids]], "sampling": {SamplingSpec fields}} -> {"completions", "weight_version"}
    POST /update_weights  {"action": "begin"}                                       -> {"session": id}
                          {"action": "load", "session": id, "path": file}            -> {"tensors": n}
                          {"action": "commit", "session": id, "version": v | null}   -> {"weight_version": v}
                          {"action": "abort", "session": id}                          -> {"aborted": true}

Weights travel as safetensors bucket files on a filesystem both sides see (/dev/shm on one host). While an
update session is open, generate requests wait; each generate runs wholly on one version and reports it.
Binds 127.0.0.1 unless --host says otherwise. update_weights always needs `Authorization: Bearer <token>`
(token read from the environment variable named by --token-env); --auth-generate requires it for generate.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from aapo_megatron.rollout.engine import RolloutError, SamplingSpec, check_prompts

log = logging.getLogger("aapo.rollout.server")

MAX_PROMPTS = 4096


class HTTPError(Exception):
    """An error answered with `status` and a JSON {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _require(body: dict, key: str, types: tuple, what: str) -> Any:
    if key not in body:
        raise HTTPError(400, f"missing field '{key}' ({what})")
    value = body[key]
    if isinstance(value, bool) and bool not in types:
        raise HTTPError(400, f"field '{key}' must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise HTTPError(400, f"field '{key}' must be {what}, got {type(value).__name__}")
    return value


def _only(body: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPError(400, f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


class RolloutService:
    """Request handling independent of HTTP: auth, validation, update sessions over a `VLLMRolloutEngine`."""

    def __init__(self, engine: Any, token: Optional[str], auth_generate: bool = False,
                 max_request_bytes: int = 16 * 2**20, session_timeout_s: float = 600.0):
        self.engine = engine
        self.token = token.encode() if token else None
        self.auth_generate = auth_generate
        self.max_request_bytes = int(max_request_bytes)
        self.session_timeout_s = float(session_timeout_s)
        self._session: Optional[str] = None
        self._session_lock = threading.Lock()
        self._watchdog: Optional[threading.Timer] = None

    # ------------------------------------------------------------------ auth

    def check_auth(self, header: Optional[str], endpoint: str) -> None:
        """401 without a bearer token, 403 with a wrong one (constant-time compare)."""
        if self.token is None:
            raise HTTPError(403, f"{endpoint} is disabled: the server was started without a token")
        if not header or not header.startswith("Bearer "):
            raise HTTPError(401, f"{endpoint} requires 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token):
            raise HTTPError(403, f"{endpoint}: invalid bearer token")

    # ------------------------------------------------------------------ endpoints

    def health(self) -> dict[str, Any]:
        """Liveness and state."""
        status = "updating" if self._session else ("incomplete" if getattr(self.engine, "_broken", None) else "ok")
        return {"status": status, "weight_version": self.engine.weight_version}

    def version(self) -> dict[str, Any]:
        """Current weight version and what is served."""
        return {"weight_version": self.engine.weight_version, "role": self.engine.role,
                "model": os.path.basename(os.path.normpath(self.engine.model_path)),
                "dtype": getattr(self.engine, "dtype", None), "vocab_size": getattr(self.engine, "vocab_size", None)}

    def generate(self, body: dict) -> dict[str, Any]:
        """Validate and run a generate request."""
        _only(body, {"prompts", "sampling"}, "generate")
        prompts = _require(body, "prompts", (list,), "a list of token-id lists")
        if len(prompts) > MAX_PROMPTS:
            raise HTTPError(400, f"too many prompts ({len(prompts)} > {MAX_PROMPTS})")
        sampling = body.get("sampling", {})
        if not isinstance(sampling, dict):
            raise HTTPError(400, f"field 'sampling' must be an object, got {type(sampling).__name__}")
        try:
            prompts = check_prompts(prompts, getattr(self.engine, "vocab_size", None))
            spec = SamplingSpec.from_dict(sampling)
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, str(exc)) from None
        try:
            out = self.engine.generate(prompts, spec)
        except RolloutError as exc:
            raise HTTPError(503, str(exc)) from None
        return {"completions": [[c.to_dict() for c in group] for group in out.completions],
                "weight_version": out.weight_version, "num_tokens": out.num_tokens, "seconds": out.seconds}

    def update_weights(self, body: dict) -> dict[str, Any]:
        """One step of an update session: begin / load / commit / abort."""
        action = _require(body, "action", (str,), "one of begin, load, commit, abort")
        if action == "begin":
            _only(body, {"action"}, "update_weights begin")
            with self._session_lock:
                if self._session is not None:
                    raise HTTPError(409, "another weight update session is active")
                self._session = secrets.token_hex(8)
            try:
                self.engine.begin_update()
            except Exception as exc:
                self._session = None
                raise HTTPError(503 if isinstance(exc, RolloutError) else 500, f"begin failed: {exc}") from None
            self._arm_watchdog(self._session)
            return {"session": self._session}
        if action not in ("load", "commit", "abort"):
            raise HTTPError(400, f"field 'action' must be one of begin, load, commit, abort, got {action!r}")
        allowed = {"action", "session"} | ({"path"} if action == "load" else set()) | (
            {"version"} if action == "commit" else set())
        _only(body, allowed, f"update_weights {action}")
        session = _require(body, "session", (str,), "the id returned by begin")
        with self._session_lock:
            if self._session is None or not hmac.compare_digest(session.encode(), self._session.encode()):
                raise HTTPError(409, f"no active weight update session {session!r} (it may have timed out)")
            self._arm_watchdog(session)
            if action == "load":
                path = _require(body, "path", (str,), "a safetensors file path on this host")
                try:
                    return {"tensors": self.engine.load_file(path)}
                except FileNotFoundError as exc:
                    raise HTTPError(400, str(exc)) from None
                except Exception as exc:  # noqa: BLE001
                    self._end_session(abort=True)
                    raise HTTPError(500, f"loading {path!r} failed, session aborted: {exc}") from None
            if action == "commit":
                version = body.get("version")
                if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
                    raise HTTPError(400, f"field 'version' must be an integer or null, got {version!r}")
                if version is not None and version <= self.engine.weight_version:
                    self._end_session(abort=True)
                    raise HTTPError(400, f"weight version must increase: current {self.engine.weight_version}, "
                                         f"got {version}; session aborted")
                self._cancel_watchdog()
                self._session = None
                return {"weight_version": self.engine.commit_update(version)}
            self._end_session(abort=True)
            return {"aborted": True}

    # ------------------------------------------------------------------ sessions

    def _end_session(self, abort: bool) -> None:
        self._cancel_watchdog()
        self._session = None
        if abort:
            self.engine.abort_update()

    def _arm_watchdog(self, session: str) -> None:
        self._cancel_watchdog()
        self._watchdog = threading.Timer(self.session_timeout_s, self._expire, args=(session,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _expire(self, session: str) -> None:
        with self._session_lock:
            if self._session == session:
                log.error("weight update session %s idle for %.0f s: aborted", session, self.session_timeout_s)
                self._end_session(abort=True)

    def close(self) -> None:
        """Abort an open session."""
        with self._session_lock:
            if self._session is not None:
                self._end_session(abort=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "aapo-rollout-server/1"
    service: RolloutService  # set on a subclass per server

    def log_message(self, fmt: str, *args: Any) -> None:  # route through logging, not stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise HTTPError(400, f"bad Content-Length {length!r}")
        if n > self.service.max_request_bytes:
            self.close_connection = True  # do not read the oversize body
            raise HTTPError(413, f"request body of {n} bytes exceeds the limit of "
                                 f"{self.service.max_request_bytes} bytes (--max-request-mb)")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _dispatch(self, method: str) -> None:
        routes = {("GET", "/health"), ("GET", "/version"), ("POST", "/generate"), ("POST", "/update_weights")}
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if (method, path) not in routes:
                if any(p == path for _, p in routes):
                    raise HTTPError(405, f"{method} is not allowed on {path}")
                raise HTTPError(404, f"no endpoint {path}; endpoints: /health /version /generate /update_weights")
            svc = self.service
            if path == "/health":
                return self._send(200, svc.health())
            if path == "/version":
                return self._send(200, svc.version())
            if path == "/update_weights" or svc.auth_generate:
                svc.check_auth(self.headers.get("Authorization"), path.lstrip("/"))
            body = self._body()
            result = svc.generate(body) if path == "/generate" else svc.update_weights(body)
            self._send(200, result)
        except HTTPError as exc:
            self._send(exc.status, {"error": exc.message})
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the server
            log.exception("internal error")
            self._send(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")


class RolloutServer:
    """A `RolloutService` served by a ThreadingHTTPServer on its own thread."""

    def __init__(self, engine: Any, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
                 auth_generate: bool = False, max_request_bytes: int = 16 * 2**20, session_timeout_s: float = 600.0):
        self.service = RolloutService(engine, token, auth_generate, max_request_bytes, session_timeout_s)
        handler = type("Handler", (_Handler,), {"service": self.service})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound."""
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8100."""
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "RolloutServer":
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="aapo-rollout-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until shutdown()."""
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop serving and abort an open update session (the engine is not closed)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.service.close()


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of aapo-rollout-server."""
    p = argparse.ArgumentParser(prog="aapo-rollout-server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--role", choices=("policy", "reference"), default="policy",
                   help="policy accepts weight updates; reference is frozen")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8100, help="TCP port (0 = any free port)")
    p.add_argument("--token-env", default="AAPO_ROLLOUT_TOKEN",
                   help="environment variable holding the bearer token (never pass a token on the command line)")
    p.add_argument("--auth-generate", action="store_true", help="require the token for /generate too")
    p.add_argument("--max-request-mb", type=float, default=16.0, help="largest accepted request body, MiB")
    p.add_argument("--session-timeout-s", type=float, default=600.0,
                   help="an update session idle this long is aborted, seconds")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--memory-fraction", type=float, default=0.15, help="vLLM gpu_memory_utilization")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion, tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-sync-timeout-s", type=float, default=600.0, help="per-stage engine timeout, seconds")
    p.add_argument("--cpu-cores", default=None,
                   help="CPU hosts: cores for the engine's threads, as VLLM_CPU_OMP_THREADS_BIND (e.g. 0-3); default all "
                        "of this process's cores. Give two servers on one host disjoint lists")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of aapo-rollout-server; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) or None
    if args.auth_generate and token is None:
        print(f"aapo-rollout-server: --auth-generate needs a token in ${args.token_env}", file=sys.stderr)
        return 2
    if args.role == "policy" and token is None:
        print(f"aapo-rollout-server: a policy server needs a bearer token for update_weights; set ${args.token_env}",
              file=sys.stderr)
        return 2
    if args.max_request_mb <= 0:
        print(f"aapo-rollout-server: --max-request-mb must be > 0, got {args.max_request_mb}", file=sys.stderr)
        return 2
    from aapo_megatron.rollout.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(args.model, role=args.role, dtype=args.dtype, memory_fraction=args.memory_fraction,
                               max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
                               seed=args.seed, weight_sync_timeout_s=args.weight_sync_timeout_s,
                               cpu_threads_bind=args.cpu_cores)
    server = RolloutServer(engine, args.host, args.port, token, args.auth_generate,
                           int(args.max_request_mb * 2**20), args.session_timeout_s)
    log.info("serving %s (%s) on %s", args.model, args.role, server.url)
    print(f"aapo-rollout-server: listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.service.close()
        server.httpd.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
