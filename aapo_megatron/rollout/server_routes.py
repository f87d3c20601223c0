"""The rollout server's own routes on vLLM's app: /health, /version, /generate, /update_weights.

Generation goes through vLLM's async engine client (`app.state.engine_client`). A weight update is one
`SessionTable` session: its buckets are files staged by the table (`shm`, same host) or tensors the engine's
weight-transfer engine receives and stages (`gloo`/`nccl`, `server_transfer`); either way they are applied at
commit, only when complete, while no generate runs (`VersionGate`): each generate runs wholly on one weight
version and reports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from aapo_megatron.rollout import server_transfer
from aapo_megatron.rollout.engine import SamplingSpec, check_prompts
from aapo_megatron.rollout.update_session import SessionError, SessionTable, describe_missing

log = logging.getLogger("aapo.rollout.server")

SEED_MAX = 2**63 - 1


@dataclass
class Limits:
    """What one request may ask for (each over-limit field answers 400, naming the limit's option)."""

    max_prompts: int = 1024
    max_n: int = 64
    max_tokens: int = 4096
    max_prompt_tokens: int = 4096
    max_temperature: float = 100.0


class VersionGate:
    """Generates share the engine; applying an update waits for them and holds new ones back (asyncio)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False

    async def acquire_read(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_write(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._writer = True
            await self._cond.wait_for(lambda: self._readers == 0)

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


class RolloutState:
    """Per-server state kept on `app.state.aapo`: role, served model, weight version, sessions, limits."""

    def __init__(self, *, role: str, model: str, dtype: str, vocab_size: Optional[int], limits: Limits,
                 sessions: Optional[SessionTable], heartbeat_interval_s: float, rpc_timeout_s: float,
                 transports: tuple[str, ...] = ("shm",), transfer_workers: int = 0,
                 logprobs_mode: str = "processed_logprobs"):
        self.role = role
        self.model = model
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.limits = limits
        self.sessions = sessions
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self.rpc_timeout_s = float(rpc_timeout_s)
        self.transports = tuple(transports)
        """Weight transports this server takes: "shm" (bucket files in --weight-dir) and its engine's backend."""
        self.transfer_workers = int(transfer_workers)
        """Engine workers in a broadcast transport's group (besides the trainer's rank)."""
        self.logprobs_mode = logprobs_mode
        """vLLM's logprobs_mode of the engine (--logprobs-mode): which log-probs each generated token carries."""
        self.version = 0
        self.broken: Optional[str] = None
        self.gate = VersionGate()
        self.session_lock = asyncio.Lock()


class BadRequest(Exception):
    """Answered 400 with the message."""


def _reject_constant(name: str) -> None:
    raise BadRequest(f"malformed JSON: {name} is not a number")


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (NaN and Infinity refused)."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_generate(body: dict[str, Any], limits: Limits, vocab_size: Optional[int]) -> tuple[list, SamplingSpec]:
    """Validate a /generate body against the limits; returns (prompts, spec) or raises BadRequest."""
    unknown = sorted(set(body) - {"prompts", "sampling"})
    if unknown:
        raise BadRequest(f"generate: unknown field(s) {unknown}; allowed: ['prompts', 'sampling']")
    if "prompts" not in body:
        raise BadRequest("missing field 'prompts' (a list of token-id lists)")
    prompts, sampling = body["prompts"], body.get("sampling", {})
    if not isinstance(prompts, list):
        raise BadRequest(f"field 'prompts' must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(f"too many prompts ({len(prompts)} > {limits.max_prompts}, --max-prompts)")
    if not isinstance(sampling, dict):
        raise BadRequest(f"field 'sampling' must be an object, got {type(sampling).__name__}")
    try:
        prompts = check_prompts(prompts, vocab_size)
        spec = SamplingSpec.from_dict(sampling)
    except (ValueError, TypeError) as exc:
        raise BadRequest(str(exc)) from None
    longest = max((len(p) for p in prompts), default=0)
    checks = [
        (spec.n <= limits.max_n, f"n={spec.n} exceeds the limit of {limits.max_n} (--max-n)"),
        (spec.max_tokens <= limits.max_tokens,
         f"max_tokens={spec.max_tokens} exceeds the limit of {limits.max_tokens} (--max-tokens)"),
        (longest <= limits.max_prompt_tokens,
         f"a prompt of {longest} tokens exceeds the limit of {limits.max_prompt_tokens} (--max-prompt-tokens)"),
        (isinstance(spec.temperature, (int, float)) and math.isfinite(spec.temperature)
         and spec.temperature <= limits.max_temperature,
         f"temperature must be finite and <= {limits.max_temperature:g}, got {spec.temperature!r}"),
        (isinstance(spec.top_p, (int, float)) and math.isfinite(spec.top_p), f"top_p must be finite, got {spec.top_p!r}"),
        (spec.seed is None or 0 <= spec.seed <= SEED_MAX - len(prompts),
         f"seed must be in [0, 2^63 - 1 - number of prompts], got {spec.seed!r}"),
        (all(isinstance(t, int) and 0 <= t < (vocab_size or 2**31) for t in spec.stop_token_ids),
         "stop_token_ids must be token ids inside the vocabulary"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadRequest(message)
    return prompts, spec


async def _generate_one(engine: Any, prompt: list[int], spec: SamplingSpec, seed: Optional[int]) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                            top_k=spec.top_k if spec.top_k > 0 else 0, max_tokens=spec.max_tokens,
                            stop_token_ids=list(spec.stop_token_ids), seed=seed,
                            logprobs=0 if spec.logprobs else None, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"aapo-{uuid.uuid4().hex}"):
        final = out
    return final


def _completions(out: Any, logprobs: bool) -> list[dict[str, Any]]:
    group = []
    for o in sorted(out.outputs, key=lambda o: o.index):
        lps = [float(step[tok].logprob) for tok, step in zip(o.token_ids, o.logprobs)] if logprobs else None
        reason = o.finish_reason if o.finish_reason in ("stop", "length") else str(o.finish_reason)
        group.append({"token_ids": list(o.token_ids), "finish_reason": reason, "logprobs": lps})
    return group


def error(status: int, message: str) -> JSONResponse:
    """A JSON error answer."""
    return JSONResponse({"error": message}, status_code=status)


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Engine liveness (503 when the engine process is dead: `server_liveness`) and update state; open without
    a token."""
    st: RolloutState = request.app.state.aapo
    dead = request.app.state.engine_watch.check(request.app.state.engine_client)
    if dead:
        return JSONResponse({"status": "dead", "error": dead, "weight_version": st.version}, status_code=503)
    status = "incomplete" if st.broken else ("updating" if st.sessions and st.sessions.session else "ok")
    return JSONResponse({"status": status, "weight_version": st.version})


@router.get("/version")
async def version(request: Request) -> JSONResponse:
    """What is served: weight version, role, model, dtype, vocabulary, the weight directory and heartbeat interval."""
    from vllm.version import __version__ as vllm_version

    st: RolloutState = request.app.state.aapo
    return JSONResponse({"weight_version": st.version, "role": st.role, "model": st.model, "dtype": st.dtype,
                         "vocab_size": st.vocab_size, "version": vllm_version,
                         "weight_dir": st.sessions.weight_dir if st.sessions else None,
                         "heartbeat_interval_s": st.heartbeat_interval_s,
                         "takeover_timeout_s": st.sessions.takeover_timeout_s if st.sessions else None,
                         "weight_transports": list(st.transports) if st.sessions else [],
                         "transfer_workers": st.transfer_workers, "logprobs_mode": st.logprobs_mode})


@router.post("/generate")
async def generate(request: Request) -> JSONResponse:
    """Sample `sampling.n` completions per token-id prompt, all on one weight version (in the reply)."""
    st: RolloutState = request.app.state.aapo
    try:
        prompts, spec = check_generate(await json_body(request), st.limits, st.vocab_size)
    except BadRequest as exc:
        return error(400, str(exc))
    watch, engine = request.app.state.engine_watch, request.app.state.engine_client
    dead = watch.check(engine)
    if dead:
        return error(503, dead)
    await st.gate.acquire_read()
    try:
        if st.broken:
            return error(503, st.broken)
        used = st.version
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outs = await asyncio.gather(*[
            _generate_one(engine, p, spec, None if spec.seed is None else spec.seed + i) for i, p in enumerate(prompts)])
        seconds = loop.time() - t0
    except Exception as exc:  # noqa: BLE001 - an engine failure is the server's 503, with its reason
        return error(503, watch.check(engine) or f"generate failed: {type(exc).__name__}: {exc}")
    finally:
        await st.gate.release_read()
    groups = [_completions(o, spec.logprobs) for o in outs]
    return JSONResponse({"completions": groups, "weight_version": used, "seconds": seconds,
                         "num_tokens": sum(len(c["token_ids"]) for g in groups for c in g)})


UPDATE_FIELDS = {"begin": {"transport"}, "load": {"session", "file"}, "heartbeat": {"session"},
                 "init": {"session", "master_address", "master_port", "world_size", "rank_offset"},
                 "update": {"session", "names", "dtype_names", "shapes"},
                 "commit": {"session", "version"}, "abort": {"session"}}
"""The fields each /update_weights action takes (besides 'action')."""


@router.post("/update_weights")
async def update_weights(request: Request) -> JSONResponse:
    """A step of an update session: begin {transport}, then per bucket load {file} (shm) or init + update
    (gloo/nccl: `server_transfer`), heartbeat, commit {version}, abort."""
    st: RolloutState = request.app.state.aapo
    if st.sessions is None:
        return error(403, "this server serves the frozen reference role; it accepts no weight updates")
    try:
        body = await json_body(request)
        action = body.get("action")
        if action not in UPDATE_FIELDS:
            raise BadRequest(f"field 'action' must be one of {sorted(UPDATE_FIELDS)}, got {action!r}")
        unknown = sorted(set(body) - UPDATE_FIELDS[action] - {"action"})
        if unknown:
            raise BadRequest(f"update_weights {action}: unknown field(s) {unknown}; allowed: "
                             f"{sorted(UPDATE_FIELDS[action])}")
        engine = request.app.state.engine_client
        if action == "begin":
            return await _begin(engine, st, body.get("transport", "shm"))
        if action in ("init", "update"):
            return await _transfer(engine, st, action, body)
        async with st.session_lock:
            if action == "load":
                return JSONResponse({"tensors": st.sessions.stage(body.get("session"), body.get("file"))})
            session = st.sessions.get(body.get("session"))
            if action == "heartbeat":
                return JSONResponse({"session": session.id})
            if action == "abort":
                st.sessions.drop()
                if session.transport in server_transfer.BROADCAST:
                    await server_transfer.abort(engine, st.rpc_timeout_s)
                return JSONResponse({"aborted": True})
            new = body.get("version")
            if new is not None and (isinstance(new, bool) or not isinstance(new, int)):
                raise BadRequest(f"field 'version' must be an integer or null, got {new!r}")
            new = st.version + 1 if new is None else new
            if new <= st.version:
                st.sessions.drop()
                raise SessionError(400, f"weight version must increase: current {st.version}, got {new}; "
                                        f"session aborted, version {st.version} still served")
            try:
                if session.transport in server_transfer.BROADCAST:
                    await server_transfer.commit(engine, st)
                else:
                    missing = st.sessions.missing(session)
                    if missing:
                        raise SessionError(400, f"{describe_missing(missing, len(st.sessions.expected))}: update "
                                                f"rejected, version {st.version} still served")
                    await _apply(engine, st, session.files)
            finally:
                st.sessions.drop()
            st.version = new
            return JSONResponse({"weight_version": new})
    except (BadRequest, server_transfer.BadTransfer) as exc:
        return error(400, str(exc))
    except SessionError as exc:
        return error(exc.status, exc.message)


async def _begin(engine: Any, st: RolloutState, transport: object) -> JSONResponse:
    """Open a session moving its weights by `transport` (one this server takes)."""
    if transport not in st.transports:
        raise BadRequest(f"update_weights begin: 'transport' must be one of {list(st.transports)} (this server's), "
                         f"got {transport!r}")
    async with st.session_lock:
        sid, taken = st.sessions.begin(str(transport))
    if taken:
        log.warning("weight update session %s was silent for over %.0f s: taken over by %s",
                    taken, st.sessions.takeover_timeout_s, sid)
    if transport in server_transfer.BROADCAST:
        try:
            await server_transfer.begin(engine, st.rpc_timeout_s)
        except Exception as exc:  # noqa: BLE001
            async with st.session_lock:
                st.sessions.drop()
            raise SessionError(500, f"starting the engine's weight update failed: {type(exc).__name__}: {exc}") from None
    return JSONResponse({"session": sid, "took_over": taken, "heartbeat_interval_s": st.heartbeat_interval_s,
                         "transfer_workers": st.transfer_workers})


async def _transfer(engine: Any, st: RolloutState, action: str, body: dict[str, Any]) -> JSONResponse:
    """init (join the trainer's group) or update (receive one bucket) of a broadcast session. The session lock
    is not held while the engine receives: heartbeats go on meanwhile."""
    async with st.session_lock:
        session = st.sessions.get(body.get("session"))
    if session.transport not in server_transfer.BROADCAST:
        raise BadRequest(f"update_weights {action}: session {session.id} moves its weights by bucket files "
                         f"('load'); '{action}' is for a {'/'.join(server_transfer.BROADCAST)} session")
    try:
        if action == "init":
            await server_transfer.init(engine, server_transfer.check_init(body, st.transfer_workers))
            return JSONResponse({"joined": True})
        info = server_transfer.check_update(body)
        await server_transfer.update(engine, info)
    except server_transfer.BadTransfer:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken group or a dead trainer: the session is over
        async with st.session_lock:
            if st.sessions.session is session:
                st.sessions.drop()
        raise SessionError(500, f"update_weights {action} failed: {type(exc).__name__}: {exc}; session aborted, "
                                f"version {st.version} still served") from None
    session.names.update(info["names"])
    return JSONResponse({"tensors": len(info["names"])})


async def _apply(engine: Any, st: RolloutState, files: list[str]) -> None:
    """Load the staged buckets into the engine while no generate runs; a failure midway marks it broken."""
    await st.gate.acquire_write()
    try:
        st.broken = "policy engine weights are incomplete: applying a weight update failed midway; send a full update"
        try:
            await engine.collective_rpc("aapo_begin_weight_update", timeout=st.rpc_timeout_s)
            for path in files:
                await engine.collective_rpc("aapo_load_weights_file", timeout=st.rpc_timeout_s, args=(path,))
            results = await engine.collective_rpc("aapo_finish_weight_update", timeout=st.rpc_timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise SessionError(500, f"applying the update failed: {type(exc).__name__}: {exc}") from None
        not_loaded = sorted({n for r in results for n in (r or {}).get("not_loaded", [])})
        if not_loaded:
            raise SessionError(500, f"the engine did not load {len(not_loaded)} parameters: {not_loaded[:5]}")
        await engine.reset_prefix_cache()
        st.broken = None
    finally:
        await st.gate.release_write()


def install(app: FastAPI, state: RolloutState) -> None:
    """Put our routes on vLLM's app in place of its own /health and /version (ours report more)."""
    ours = {(r.path, m) for r in router.routes for m in getattr(r, "methods", ())}
    app.router.routes[:] = [r for r in app.router.routes
                            if not any((getattr(r, "path", None), m) in ours for m in (getattr(r, "methods", None) or ()))]
    app.include_router(router)
    app.state.aapo = state
