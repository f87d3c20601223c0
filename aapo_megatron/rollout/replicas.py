"""`ReplicaSet`: one `RolloutEngine` over the data-parallel replicas of an engine (`rollout.data_parallel_size`).

- generate: the prompts are split into contiguous chunks, one per replica (sizes differ by at most one, the
  first replicas take the larger ones), generated at once, and returned in prompt order. Replica r's chunk
  starting at prompt k is sampled with seed + k, so every prompt keeps the seed it has in a single engine
  (`SamplingSpec.seed`: prompt i uses seed + i) and N replicas return the samples one engine would.
- update_weights: the trainer's tensor stream is read once and fanned out to every replica (each gets the
  same tensor objects, through a short queue, and streams them over its own transport); all replicas get
  the same new version. If one fails, the error names it; the others have the new weights, and generate
  refuses until the versions agree again (the trainer restarts the engines and syncs).
- sleep / wake_up / close go to every replica; `alive()` says which replicas' engine processes still run.
- restart_dead: a replica whose engine process died is closed and started again alone (`restart(i)`, the
  placement it had); the others keep their processes and weights. A restarted policy replica holds the
  starting checkpoint (version 0), so generate refuses until the next update_weights brings every replica
  to one version (the trainer's restart policy resyncs: `trainer/rollout_side.py`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from aapo_megatron.rollout.engine import GenerationResult, NamedTensors, RolloutEngine, RolloutError, SamplingSpec
from aapo_megatron.rollout.layout import chunks
from aapo_megatron.rollout.transport.base import WeightSyncError

FAN_OUT_DEPTH = 4
"""Tensors queued per replica during a weight sync (the slowest replica paces the stream)."""

_POLL_S = 0.1
_END = object()


class _StreamFailed(Exception):
    """The trainer's tensor stream raised; every replica's sync stops with it."""


def start_all(calls: Sequence[Callable[[], Any]], name: str) -> Callable[[], list[tuple[Any, Optional[BaseException]]]]:
    """Start each call on its own daemon thread (a hung engine cannot block interpreter exit); returns a
    function that waits for all and gives (result, error) per call."""
    out: list[tuple[Any, Optional[BaseException]]] = [(None, None)] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = (calls[i](), None)
        except BaseException as exc:  # noqa: BLE001 - returned to the caller
            out[i] = (None, exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"{name}-{i}", daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()

    def join() -> list[tuple[Any, Optional[BaseException]]]:
        for t in threads:
            t.join()
        return out

    return join


def run_on_all(calls: Sequence[Callable[[], Any]], name: str) -> list[tuple[Any, Optional[BaseException]]]:
    """`start_all`, waited for."""
    return start_all(calls, name)()


def engine_alive(engine: Any) -> bool:
    """False when a vLLM engine's core process is known dead (or the engine is closed); True otherwise."""
    if getattr(engine, "llm", True) is None:
        return False
    core = getattr(getattr(getattr(engine, "llm", None), "llm_engine", None), "engine_core", None)
    return not getattr(getattr(core, "resources", None), "engine_dead", False)


class _Fanout:
    """One reader of the trainer's tensor stream feeding a bounded queue per replica."""

    def __init__(self, n: int):
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=FAN_OUT_DEPTH) for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]  # set when replica i stops reading (finished or failed)

    def stream(self, i: int) -> Iterator[tuple[str, Any]]:
        """What replica i's transport reads: the stream's items, in order."""
        while True:
            item = self.queues[i].get()
            if item is _END:
                return
            if isinstance(item, _StreamFailed):
                raise item
            yield item

    def feed(self, named_tensors: NamedTensors) -> Optional[BaseException]:
        """Read the stream once, handing each item to every replica still reading; the stream's error, if any."""
        error: Optional[BaseException] = None
        try:
            for item in named_tensors:
                for i in range(len(self.queues)):
                    self._put(i, item)
        except BaseException as exc:  # noqa: BLE001 - every replica is told, then the caller re-raises
            error = exc
        for i in range(len(self.queues)):
            self._put(i, _END if error is None else _StreamFailed(f"{type(error).__name__}: {error}"))
        return error

    def _put(self, i: int, item: Any) -> None:
        while not self.done[i].is_set():
            try:
                self.queues[i].put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue


class ReplicaSet(RolloutEngine):
    """DP replicas of one role's engine behind the `RolloutEngine` interface (see the module docstring)."""

    def __init__(self, replicas: Sequence[RolloutEngine], role: str, labels: Optional[Sequence[str]] = None,
                 restart: Optional[Callable[[int], RolloutEngine]] = None):
        """`replicas` in order (replica r takes the r-th chunk of every batch); `labels` (e.g. their cores) for
        errors; `restart(r)` starts replica r afresh where it ran (for `restart_dead`)."""
        if not replicas:
            raise ValueError("a ReplicaSet needs at least one replica")
        self.replicas = list(replicas)
        self.role = role
        self.labels = list(labels) if labels is not None else [""] * len(self.replicas)
        self.restart = restart
        self.vocab_size = getattr(self.replicas[0], "vocab_size", None)

    def _name(self, i: int) -> str:
        label = f" ({self.labels[i]})" if self.labels[i] else ""
        return f"{self.role} replica {i}/{len(self.replicas)}{label}"

    def _raise_failures(self, results: list[tuple[Any, Optional[BaseException]]], call: str,
                        kind: type = RolloutError) -> list[Any]:
        failed = [(i, e) for i, (_, e) in enumerate(results) if e is not None]
        if failed:
            first = failed[0][1]
            text = "; ".join(f"{self._name(i)}: {type(e).__name__}: {e}" for i, e in failed)
            raise kind(f"{call} failed on {len(failed)} of {len(self.replicas)} replicas: {text}") from first
        return [r for r, _ in results]

    # ------------------------------------------------------------------ generation

    @property
    def weight_version(self) -> int:
        """The newest weight version among the replicas (they agree after every successful sync)."""
        return max(r.weight_version for r in self.replicas)

    def versions(self) -> list[int]:
        """Each replica's weight version."""
        return [r.weight_version for r in self.replicas]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> GenerationResult:
        """Prompts split over the replicas in contiguous chunks, per-prompt seeds kept; results in prompt order."""
        versions = self.versions()
        if len(set(versions)) > 1:
            raise RolloutError(f"{self.role} replicas serve different weight versions {versions} (a weight sync "
                               f"failed on some): update_weights must succeed on all before generating")
        prompts = list(prompts)
        spans = [(a, b) for a, b in chunks(len(prompts), len(self.replicas)) if b > a] or [(0, 0)]

        def call(i: int, a: int, b: int) -> Callable[[], GenerationResult]:
            spec = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + a)
            return lambda: self.replicas[i].generate(prompts[a:b], spec)

        t0 = time.perf_counter()
        results = self._raise_failures(
            run_on_all([call(i, a, b) for i, (a, b) in enumerate(spans)], f"aapo-{self.role}-generate"), "generate")
        seconds = time.perf_counter() - t0
        got = sorted({res.weight_version for res in results})
        if len(got) > 1:
            raise RolloutError(f"{self.role} replicas generated with different weight versions {got}")
        completions = [group for res in results for group in res.completions]
        return GenerationResult(completions=completions, weight_version=got[0], seconds=seconds)

    # ------------------------------------------------------------------ weight sync

    def update_weights(self, named_tensors: NamedTensors, version: Optional[int] = None) -> int:
        """Fan the stream out to every replica (read once); all get `version` (default: the newest + 1)."""
        new_version = self.weight_version + 1 if version is None else int(version)
        fan = _Fanout(len(self.replicas))

        def sync(i: int) -> Callable[[], int]:
            def run() -> int:
                try:
                    return self.replicas[i].update_weights(fan.stream(i), version=new_version)
                finally:
                    fan.done[i].set()
            return run

        join = start_all([sync(i) for i in range(len(self.replicas))], f"aapo-{self.role}-sync")
        stream_error = fan.feed(named_tensors)
        results = join()
        if stream_error is not None:
            raise stream_error
        self._raise_failures(results, f"weight sync to version {new_version}", WeightSyncError)
        return new_version

    @property
    def last_sync(self) -> Any:
        """The first replica's `SyncStats` of the last sync (None before one)."""
        return getattr(self.replicas[0], "last_sync", None)

    # ------------------------------------------------------------------ sleep, health, close

    def sleep(self, level: int = 1) -> None:
        """Put every replica to sleep."""
        self._raise_failures(run_on_all([lambda r=r: r.sleep(level) for r in self.replicas], "aapo-sleep"), "sleep")

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Wake `tags` (None = all) on every replica."""
        self._raise_failures(run_on_all([lambda r=r: r.wake_up(tags) for r in self.replicas], "aapo-wake"), "wake_up")

    def alive(self) -> list[bool]:
        """Per replica: whether its engine process still runs."""
        return [engine_alive(r) for r in self.replicas]

    def dead(self) -> list[int]:
        """Indices of the replicas whose engine process is known dead."""
        return [i for i, ok in enumerate(self.alive()) if not ok]

    def restart_dead(self) -> list[int]:
        """Close each dead replica and start it again with `restart` (the others keep running); the indices
        restarted. A failed start raises RolloutError naming the replica (the others stay as they are)."""
        dead = self.dead()
        if dead and self.restart is None:
            raise RolloutError(f"{self._name(dead[0])} is dead and this ReplicaSet was built without a restart")
        for i in dead:
            try:
                self.replicas[i].close()
            except Exception:  # noqa: BLE001 - it is dead already; its resources go with it
                pass
            try:
                self.replicas[i] = self.restart(i)
            except Exception as exc:
                raise RolloutError(f"restarting {self._name(i)} failed: {type(exc).__name__}: {exc}") from exc
        return dead

    def close(self) -> None:
        """Close every replica (all are tried; the first error is raised after)."""
        errors = [e for _, e in run_on_all([r.close for r in self.replicas], "aapo-close") if e is not None]
        if errors:
            raise errors[0]
