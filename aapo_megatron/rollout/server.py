"""`aapo-rollout-server`: one vLLM engine behind vLLM's own OpenAI-compatible FastAPI/uvicorn app (disaggregated runs).

    AAPO_ROLLOUT_TOKEN=secret aapo-rollout-server --model /ckpt/hf --port 8100          # policy
    AAPO_ROLLOUT_TOKEN=secret aapo-rollout-server --model /ckpt/hf --role reference --port 8101

The app is the one `vllm serve` builds (its `/v1/completions` etc. included), with our worker extension in
the engine, a policy engine's weight-transfer engine (`gloo` on CPU, vLLM's `nccl` on GPU: weights from a
trainer on another host, `server_transfer.py`; bucket files in --weight-dir serve a trainer on this host), our routes (`server_routes.py`: /health, /version, /generate, /update_weights) in place of its
/health and /version, and `RequestGuard` in front of everything: a bearer token on every route but /health,
a request-body size and read-time bound. Idle connections are closed after --keep-alive-timeout-s. When the
engine process dies, /health and /generate answer 503 and the server exits 1 (`server_liveness.py`).
Binds 127.0.0.1 unless --host says otherwise; any other address needs a token (exit 2 without one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Optional

from aapo_megatron.distributed import current_platform
from aapo_megatron.rollout.transport.registry import is_loopback

log = logging.getLogger("aapo.rollout.server")

WORKER_EXTENSION = "aapo_megatron.rollout.worker_extension.WeightSyncExtension"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of aapo-rollout-server."""
    p = argparse.ArgumentParser(prog="aapo-rollout-server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--role", choices=("policy", "reference"), default="policy",
                   help="policy accepts weight updates; reference is frozen")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8100, help="TCP port")
    p.add_argument("--token-env", default="AAPO_ROLLOUT_TOKEN",
                   help="environment variable holding the bearer token (never pass a token on the command line)")
    p.add_argument("--weight-dir", default=None,
                   help="the only directory weight-update bucket files are read from (default /dev/shm)")
    g = p.add_argument_group("request limits (over a limit answers 4xx)")
    g.add_argument("--max-request-mb", type=float, default=16.0, help="largest request body, MiB")
    g.add_argument("--max-prompts", type=int, default=1024, help="prompts per generate request")
    g.add_argument("--max-n", type=int, default=64, help="completions per prompt")
    g.add_argument("--max-tokens", type=int, default=None, help="longest completion (default: --max-model-len)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: --max-model-len - 1)")
    g = p.add_argument_group("connections and update sessions")
    g.add_argument("--body-timeout-s", type=float, default=30.0, help="a request body must arrive within this, seconds")
    g.add_argument("--keep-alive-timeout-s", type=float, default=5.0,
                   help="an idle connection (none sent yet, or between requests) is closed after this, seconds")
    g.add_argument("--limit-concurrency", type=int, default=4096,
                   help="open connections + running requests before uvicorn answers 503")
    g.add_argument("--heartbeat-interval-s", type=float, default=5.0, help="how often a trainer in an update "
                   "session must be heard from (the client sends heartbeats at this interval), seconds")
    g.add_argument("--takeover-timeout-s", type=float, default=30.0,
                   help="a new update takes over a session silent for this long, seconds")
    g.add_argument("--dead-engine-exit-s", type=float, default=10.0,
                   help="once the engine process is dead, /health and /generate answer 503 for this long, then "
                        "the server exits 1, seconds")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--memory-fraction", type=float, default=0.15, help="vLLM gpu_memory_utilization")
    g.add_argument("--kv-cache-mb", type=float, default=None, help="KV cache size, MiB (overrides --memory-fraction)")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion, tokens")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--logprobs-mode", choices=("processed_logprobs", "raw_logprobs"), default="processed_logprobs",
                   help="log-probs returned with each token: processed = after temperature/top-k/top-p (what the "
                        "trainer's algorithm.logprob_temperature=sampling, the default, compares with); raw = of the "
                        "logits as they are (logprob_temperature=raw). The trainer checks it when it connects")
    g.add_argument("--weight-sync-timeout-s", type=float, default=600.0, help="per-call engine timeout, seconds")
    g.add_argument("--cpu-cores", default=None,
                   help="CPU hosts: cores for the engine's threads, as VLLM_CPU_OMP_THREADS_BIND (e.g. 0-3); default all "
                        "of this process's cores. Give two servers on one host disjoint lists")
    return p


def check_args(args: argparse.Namespace, token: Optional[str]) -> Optional[str]:
    """The first problem with the options (a message naming the option), or None."""
    if token is None and not is_loopback(args.host):
        return (f"--host {args.host} is reachable from other machines: set a bearer token in ${args.token_env} "
                f"(every route but /health then requires it)")
    if token is None and args.role == "policy":
        return f"a policy server needs a bearer token for weight updates; set ${args.token_env}"
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model!r} is not an HF model directory (no config.json)"
    if args.weight_dir is not None and not os.path.isdir(args.weight_dir):
        return f"--weight-dir {args.weight_dir!r} is not a directory"
    for name in ("max_request_mb", "max_prompts", "max_n", "body_timeout_s", "keep_alive_timeout_s",
                 "limit_concurrency", "heartbeat_interval_s", "takeover_timeout_s", "dead_engine_exit_s"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
    if args.takeover_timeout_s <= args.heartbeat_interval_s:
        return (f"--takeover-timeout-s ({args.takeover_timeout_s:g}) must exceed --heartbeat-interval-s "
                f"({args.heartbeat_interval_s:g}), or live trainers would be taken over")
    return None


def vllm_args(args: argparse.Namespace, hf_config: dict) -> argparse.Namespace:
    """vLLM's own server options (its parser, its defaults) for this server."""
    import torch
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from aapo_megatron.rollout.server_transfer import transfer_backend
    from aapo_megatron.rollout.vllm_engine import cpu_scheduler_kwargs, resolve_dtype

    argv = ["--model", args.model, "--dtype", resolve_dtype(args.dtype), "--skip-tokenizer-init",
            "--host", args.host, "--port", str(args.port), "--seed", str(args.seed),
            "--tensor-parallel-size", str(args.tensor_parallel_size), "--worker-extension-cls", WORKER_EXTENSION,
            "--served-model-name", os.path.basename(os.path.normpath(args.model)), "--disable-uvicorn-access-log",
            "--logprobs-mode", args.logprobs_mode]
    if args.role == "policy":  # the network weight transport's engine side (server_transfer.py)
        backend = transfer_backend(current_platform().cuda)
        argv += ["--weight-transfer-config", json.dumps({"backend": backend})]
    if args.kv_cache_mb is not None:
        argv += ["--kv-cache-memory-bytes", str(int(args.kv_cache_mb * 2**20))]
    else:
        argv += ["--gpu-memory-utilization", str(args.memory_fraction)]
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if not current_platform().cuda:
        sched = cpu_scheduler_kwargs(args.max_model_len, hf_config)
        argv += ["--enforce-eager", "--no-enable-chunked-prefill",
                 "--max-num-batched-tokens", str(sched["max_num_batched_tokens"])]
    parsed = make_arg_parser(FlexibleArgumentParser(prog="aapo-rollout-server (vLLM)")).parse_args(argv)
    validate_parsed_serve_args(parsed)
    return parsed


async def serve(args: argparse.Namespace, token: Optional[str], hf_config: dict) -> int:
    """Build vLLM's app around its engine, add our routes and guard, and serve until SIGINT/SIGTERM (exit code
    0) or until --dead-engine-exit-s after the engine process died (exit code 1)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    from aapo_megatron.rollout.server_guard import IdleClosingH11Protocol, RequestGuard
    from aapo_megatron.rollout.server_liveness import EngineWatch
    from aapo_megatron.rollout.server_routes import Limits, RolloutState, install
    from aapo_megatron.rollout.server_transfer import num_transfer_workers, transfer_backend
    from aapo_megatron.rollout.update_session import SessionTable, required_tensor_names
    from aapo_megatron.rollout.weight_sync import default_shm_dir

    vargs = vllm_args(args, hf_config)
    _, sock = setup_server(vargs, reuse_port=False)
    print(f"aapo-rollout-server: listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    async with build_async_engine_client(vargs) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(vargs, supported_tasks, engine_client.model_config)
        context = engine_client.model_config.max_model_len
        limits = Limits(max_prompts=args.max_prompts, max_n=args.max_n,
                        max_tokens=args.max_tokens or context, max_prompt_tokens=args.max_prompt_tokens or context - 1)
        sessions = None
        if args.role == "policy":
            sessions = SessionTable(args.weight_dir or default_shm_dir(), required_tensor_names(args.model),
                                    args.takeover_timeout_s)
        state = RolloutState(role=args.role, model=os.path.basename(os.path.normpath(args.model)),
                             dtype=vargs.dtype, vocab_size=hf_config.get("vocab_size"), limits=limits,
                             sessions=sessions, heartbeat_interval_s=args.heartbeat_interval_s,
                             rpc_timeout_s=args.weight_sync_timeout_s,
                             transports=("shm", transfer_backend(current_platform().cuda)),
                             transfer_workers=num_transfer_workers(engine_client), logprobs_mode=args.logprobs_mode)
        install(app, state)
        watch = app.state.engine_watch = EngineWatch(args.role, args.dead_engine_exit_s)
        app.middleware_stack = None  # vLLM's bootstrap built it already; Starlette rebuilds it on the first call
        app.add_middleware(RequestGuard, token=token, max_body_bytes=int(args.max_request_mb * 2**20),
                           body_timeout_s=args.body_timeout_s)
        await init_app_state(engine_client, app.state, vargs, supported_tasks)
        log.info("serving %s (%s) on %s:%s", args.model, args.role, args.host, args.port)
        watching = asyncio.get_running_loop().create_task(watch.run(app, engine_client))
        try:
            shutdown = await serve_http(app, sock=sock, host=args.host, port=args.port, log_level="info",
                                        access_log=False, timeout_keep_alive=args.keep_alive_timeout_s,
                                        limit_concurrency=args.limit_concurrency, http=IdleClosingH11Protocol)
        finally:
            watching.cancel()
            if sessions is not None:
                sessions.drop()
    try:
        await shutdown
    finally:
        sock.close()
    return watch.exit_code


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of aapo-rollout-server; returns the exit code (2: bad options, before any work)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) or None
    problem = check_args(args, token)
    if problem:
        print(f"aapo-rollout-server: {problem}", file=sys.stderr)
        return 2
    with open(os.path.join(args.model, "config.json")) as fh:
        hf_config = json.load(fh)
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from aapo_megatron.rollout.scratch_dirs import owned_tempdir
    from aapo_megatron.rollout.vllm_engine import all_cpu_cores_bind

    cli_env_setup()
    os.environ["VLLM_KEEP_ALIVE_ON_ENGINE_DEATH"] = "1"  # our EngineWatch decides when a dead engine's server exits
    bind = args.cpu_cores or (all_cpu_cores_bind() if args.tensor_parallel_size == 1 else None)
    if bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    ipc_dir = None
    if "VLLM_RPC_BASE_PATH" not in os.environ:  # vLLM's ZMQ socket files: a directory of ours, removed below
        ipc_dir = os.environ["VLLM_RPC_BASE_PATH"] = owned_tempdir("aapo-vllm-ipc-")
    code = 0
    try:
        code = uvloop.run(serve(args, token, hf_config))
    except KeyboardInterrupt:
        pass
    finally:
        if ipc_dir is not None:
            import shutil

            shutil.rmtree(ipc_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
