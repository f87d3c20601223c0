"""`RolloutEngine` over HTTP: talks to an `aapo-rollout-server` (see server.py for the protocol)."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

import torch

from aapo_megatron.rollout.engine import (
    ENGINE_DTYPES,
    Completion,
    GenerationResult,
    NamedTensors,
    RolloutEngine,
    RolloutError,
    SamplingSpec,
    check_prompts,
)
from aapo_megatron.distributed import current_platform
from aapo_megatron.rollout.transport.http_session import HttpSyncClient, ServerSession, local_address_toward
from aapo_megatron.rollout.transport.registry import KEY as TRANSPORT_KEY
from aapo_megatron.rollout.transport.registry import is_loopback_url, load_transport, resolve_transport
from aapo_megatron.rollout.weight_sync import FileSink, SyncStats, stream_via_files


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect, so the bearer token is never sent to another URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl!r} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


class ServerUnreachable(RolloutError):
    """No connection to the rollout server (not running, or still starting)."""


class RemoteRolloutEngine(RolloutEngine):
    """Client of one rollout server. Weight updates go by `rollout.weight_transport`, resolved against the
    server's URL: `shm` streams bucket files through `shm_dir` (a directory inside the server's --weight-dir;
    loopback servers only), `gloo`/`nccl` broadcast the buckets to the server's workers over a group this
    process opens (rank 0, at its address toward the server), through the server's update session."""

    def __init__(self, url: str, token: Optional[str] = None, token_env: str = "AAPO_ROLLOUT_TOKEN",
                 timeout_s: float = 600.0, weight_sync_bucket_mb: float = 512, weight_sync_timeout_s: float = 600.0,
                 shm_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None, weight_transport: str = "auto"):
        """token=None reads it from $token_env (may stay None for an unauthenticated generate-only server)."""
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get(token_env) or None)
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(weight_sync_bucket_mb * 2**20)
        self.sync_timeout_s = float(weight_sync_timeout_s)
        self.shm_dir = shm_dir
        self.dtype = dtype
        self.weight_transport = weight_transport
        """The requested transport (`transport.CHOICES`); `transport` is what it resolved to."""
        self.transport: Optional[str] = None
        self.weight_dir: Optional[str] = None  # the server's --weight-dir (from /version, on the first update)
        self.transfer_workers = 0
        self.heartbeat_interval_s = 5.0  # the server's, from /version
        self.takeover_timeout_s = 30.0
        self.last_sync: Optional[SyncStats] = None
        self._broadcast: Any = None  # gloo/nccl: the BroadcastTransport and its HttpSyncClient, made on first use
        self._sync_client: Optional[HttpSyncClient] = None

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: Optional[dict] = None, auth: bool = False) -> dict[str, Any]:
        """One JSON request (the token on every route; redirects refused); a non-2xx answer raises RolloutError
        naming the route, the status and the server's message. `auth` is kept for callers; the token always goes."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            message = exc.reason
            if not 300 <= exc.code < 400:
                try:
                    message = json.loads(exc.read()).get("error", "") or exc.reason
                except Exception:  # noqa: BLE001
                    pass
            raise RolloutError(f"rollout server {self.url}{path}: HTTP {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise ServerUnreachable(f"rollout server {self.url}{path} unreachable: {exc.reason}") from None
        except OSError as exc:  # e.g. a read timeout
            raise RolloutError(f"rollout server {self.url}{path}: {type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ RolloutEngine

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> GenerationResult:
        """Sample completions on the server; all from one weight version (reported)."""
        prompts = check_prompts(prompts)
        out = self.request("POST", "/generate", {"prompts": prompts, "sampling": sampling.to_dict()})
        groups = [[Completion.from_dict(c) for c in group] for group in out["completions"]]
        return GenerationResult(completions=groups, weight_version=int(out["weight_version"]),
                                seconds=float(out.get("seconds", 0.0)))

    @property
    def weight_version(self) -> int:
        """The server's current weight version."""
        return int(self.request("GET", "/version")["weight_version"])

    def health(self) -> dict[str, Any]:
        """The server's /health answer."""
        return self.request("GET", "/health")

    def use_server_info(self, info: dict[str, Any]) -> None:
        """Take the server's /version answer: its session timings, weight directory, dtype and transports; resolves
        `transport` (RolloutError naming rollout.weight_transport when it cannot reach this server)."""
        self.weight_dir = info.get("weight_dir")
        self.transfer_workers = int(info.get("transfer_workers") or 0)
        self.heartbeat_interval_s = float(info.get("heartbeat_interval_s") or self.heartbeat_interval_s)
        self.takeover_timeout_s = float(info.get("takeover_timeout_s") or self.takeover_timeout_s)
        if info.get("dtype") in ENGINE_DTYPES and self.dtype is None:
            self.dtype = ENGINE_DTYPES[info["dtype"]]
        try:
            name = resolve_transport(self.weight_transport, placement="server", cuda=current_platform().cuda,
                                     same_host=is_loopback_url(self.url))
        except ValueError as exc:
            raise RolloutError(f"{exc} (server {self.url})") from None
        offered = info.get("weight_transports", ["shm"] if self.weight_dir else [])
        if info.get("role") == "policy" and name not in offered:
            raise RolloutError(f"'{TRANSPORT_KEY}': {name} cannot reach the rollout server {self.url}: it takes "
                               f"{offered or 'no weight updates'}")
        self.transport = name

    def update_weights(self, named_tensors: NamedTensors, version: Optional[int] = None) -> int:
        """Send HF-named tensors to the server by the resolved transport; returns the new version."""
        if self.transport is None:
            self.use_server_info(self.request("GET", "/version"))
        if self.transport == "shm":
            return self._update_by_files(named_tensors, version)
        if self._broadcast is None:
            session = ServerSession(self._post_update, self.heartbeat_interval_s, self.takeover_timeout_s)
            self._sync_client = HttpSyncClient(session, self.transport, self.transfer_workers)
            self._broadcast = load_transport(self.transport)(
                self._sync_client, num_workers=self.transfer_workers, master_address=local_address_toward(self.url))
        self._sync_client.version = version
        self.last_sync = self._broadcast.sync(named_tensors, bucket_bytes=self.bucket_bytes,
                                              timeout_s=self.sync_timeout_s, dtype=self.dtype)
        return int(self._sync_client.result["weight_version"])

    def _post_update(self, body: dict) -> dict[str, Any]:
        return self.request("POST", "/update_weights", body, auth=True)

    def _update_by_files(self, named_tensors: NamedTensors, version: Optional[int]) -> int:
        """`shm`: stream bucket files into the server's weight directory, one session (heartbeats meanwhile)."""
        if not self.weight_dir:
            raise RolloutError(f"rollout server {self.url} accepts no weight updates (its /version names no weight_dir)")
        root = os.path.realpath(self.weight_dir)
        session = ServerSession(self._post_update, self.heartbeat_interval_s, self.takeover_timeout_s)
        result: dict[str, Any] = {}

        def load(path: str) -> None:
            real = os.path.realpath(path)
            if os.path.commonpath([real, root]) != root:
                raise RolloutError(f"weight bucket {path} is outside the rollout server's weight directory {root}: "
                                   f"set rollout.server_weight_dir to a directory inside it")
            session.call("load", file=os.path.relpath(real, root))

        def finish() -> None:
            result.update(session.call("commit", version=version))

        try:
            self.last_sync = stream_via_files(FileSink(lambda: session.begin(), load, finish,
                                                       lambda: session.call("abort")), named_tensors,
                                              bucket_bytes=self.bucket_bytes, timeout_s=self.sync_timeout_s,
                                              dtype=self.dtype, shm_dir=self.shm_dir or self.weight_dir)
        finally:
            session.close()
        return int(result["weight_version"])

    def close(self) -> None:
        """Leave the weight-transfer group (if one was opened)."""
        broadcast, self._broadcast = self._broadcast, None
        if broadcast is not None:
            broadcast.close()


WAIT_ENV = "AAPO_ROLLOUT_WAIT_S"
"""Seconds the trainer waits for a rollout server that does not accept connections yet (the Slurm launcher sets
it when it starts the servers with the trainer); unset or 0: no wait."""


def server_wait_s() -> float:
    """$AAPO_ROLLOUT_WAIT_S as seconds (0 when unset); RolloutError names the variable when it is not a number."""
    text = os.environ.get(WAIT_ENV, "").strip()
    try:
        value = float(text) if text else 0.0
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise RolloutError(f"${WAIT_ENV} must be a number of seconds >= 0, got {text!r}")
    return value


def _server_info(client: RemoteRolloutEngine, wait_s: float) -> dict[str, Any]:
    """GET /version, retried every second while the server is unreachable, for up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.request("GET", "/version")
        except ServerUnreachable as exc:
            if time.monotonic() >= deadline:
                if wait_s > 0:
                    raise ServerUnreachable(f"{exc} (waited {wait_s:.0f} s, ${WAIT_ENV})") from None
                raise
            time.sleep(1.0)


def connect_servers(rollout_cfg: Any, *, reference: bool, vocab_size: Optional[int] = None,
                    logprobs_mode: Optional[str] = None) -> tuple[RemoteRolloutEngine, Optional[RemoteRolloutEngine]]:
    """Clients of a placement=server run's `aapo-rollout-server`s (a `RolloutConfig`), checked before any step.

    Each server must answer, serve the expected role (policy at `server_url`, reference at
    `reference_server_url`) and, when `vocab_size` is given, a model with that vocabulary. The policy client
    needs the bearer token (`$<rollout.token_env>`) for weight updates. `logprobs_mode` (vLLM's, from
    `algorithms.temperature.engine_logprobs_mode`) is what the policy server's log-probs must be. Weight syncs stream in the served dtype by
    `rollout.weight_transport` (auto: shm through `rollout.server_weight_dir` for a loopback server, gloo for one on
    another CPU host, nccl from GPU trainers), which the policy server must take. RolloutError names what is wrong.
    """
    wait_s = server_wait_s()

    def connect(url: Optional[str], role: str, setting: str) -> RemoteRolloutEngine:
        if not url:
            raise RolloutError(f"rollout.placement=server needs {setting}: the URL of an aapo-rollout-server "
                               f"started with --role {role}")
        client = RemoteRolloutEngine(url, token_env=rollout_cfg.token_env, timeout_s=rollout_cfg.server_timeout_s,
                                     weight_sync_bucket_mb=rollout_cfg.weight_sync_bucket_mb,
                                     weight_sync_timeout_s=rollout_cfg.weight_sync_timeout_s,
                                     shm_dir=rollout_cfg.server_weight_dir,
                                     weight_transport=getattr(rollout_cfg, "weight_transport", "auto"))
        info = _server_info(client, wait_s)
        if info.get("role") != role:
            raise RolloutError(f"{setting}={url} serves the {info.get('role')!r} role, not {role!r}: start that "
                               f"server with --role {role}")
        served_vocab = info.get("vocab_size")
        if vocab_size is not None and served_vocab is not None and int(served_vocab) != int(vocab_size):
            raise RolloutError(f"{setting}={url} serves {info.get('model')!r} with a vocabulary of {served_vocab} "
                               f"tokens; the trained model has {vocab_size}")
        served_mode = info.get("logprobs_mode", "raw_logprobs")  # older servers: vLLM's default
        if role == "policy" and logprobs_mode is not None and served_mode != logprobs_mode:
            raise RolloutError(f"{setting}={url} returns {served_mode} but this run compares its log-probs with "
                               f"{logprobs_mode} (algorithm.logprob_temperature): start that server with "
                               f"--logprobs-mode {logprobs_mode}")
        client.use_server_info(info)
        return client

    policy = connect(rollout_cfg.server_url, "policy", "rollout.server_url")
    if policy.token is None:
        raise RolloutError(f"the policy rollout server needs a bearer token for weight updates: set "
                           f"${rollout_cfg.token_env} to the token the server was started with")
    ref = connect(rollout_cfg.reference_server_url, "reference", "rollout.reference_server_url") if reference else None
    logging.getLogger(__name__).info("policy server %s: weights by %s (rollout.weight_transport: %s)", policy.url,
                                     policy.transport, getattr(rollout_cfg, "weight_transport", "auto"))
    return policy, ref
