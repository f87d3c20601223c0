"""Reward worker pool: scores completions in worker processes with a per-sample deadline.

    pool = RewardPool(cfg.reward)
    result = pool.score(completions, samples)        # result.rewards: [N, F] float32, NaN allowed
    adv_inputs = (result.rewards, result.weights)    # what the grouped-advantage op takes

Workers are fresh interpreters (`aapo_megatron.rewards.worker`, no torch), each on its own socket, so
the parent always knows which sample a worker is on. Samples go out in small chunks; the deadline of
the sample a worker is on is `timeout_s` after the worker's last answer. A worker past its deadline is
killed (SIGKILL, so hangs inside C code stop too) and replaced; a worker that dies is replaced. Its
current sample gets `on_failure` (NaN or 0) in every column and is counted; the rest of its chunk goes
back to the queue. A reward function that raises fails only its own column of that sample (counted as
an error); the worker keeps going. One pool serves one thread; create it in a long-lived thread (the
workers are killed by Linux when the creating thread exits).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Mapping, Optional, Sequence

import torch

from aapo_megatron.config import RewardConfig
from aapo_megatron.rewards.registry import RewardError, build_options, resolve_reward

logger = logging.getLogger(__name__)

_MAX_MESSAGES = 5
_MAX_CHUNK = 16
_STARTUP_TIMEOUT_S = 120.0
# The directory holding the aapo_megatron package, so workers import it even when it is not installed.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class RewardResult:
    """Per-function rewards of one batch plus what went wrong."""

    rewards: torch.Tensor
    """[N, F] float32; NaN = the function does not apply, or the sample failed with on_failure=nan."""
    names: list[str]
    """[F] reward function names, in config order."""
    weights: torch.Tensor
    """[F] float32 weights from reward.functions."""
    failed: torch.Tensor
    """[N] bool: the sample timed out, its worker died, or one of its functions raised."""
    num_timeouts: int = 0
    """Samples whose worker passed the deadline (killed and replaced)."""
    num_crashes: int = 0
    """Samples whose worker process died."""
    num_errors: int = 0
    """Samples where at least one reward function raised."""
    messages: list[str] = field(default_factory=list)
    """The first few failure messages."""
    elapsed_s: float = 0.0
    """Wall time of the score() call, seconds."""

    def total(self) -> torch.Tensor:
        """[N] NaN-ignoring weighted sum over functions (0 where every function is NaN, like the fused op)."""
        return torch.where(torch.isnan(self.rewards), 0.0, self.rewards) @ self.weights

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Scalar metrics: per-function NaN-ignoring mean and NaN fraction, failure counts, throughput."""
        out: dict[str, float] = {}
        n = self.rewards.shape[0]
        for j, name in enumerate(self.names):
            col = self.rewards[:, j]
            valid = ~torch.isnan(col)
            out[f"{prefix}{name}/mean"] = float(col[valid].mean()) if valid.any() else math.nan
            out[f"{prefix}{name}/nan_frac"] = float((~valid).float().mean()) if n else 0.0
        out[f"{prefix}timeouts"] = float(self.num_timeouts)
        out[f"{prefix}crashes"] = float(self.num_crashes)
        out[f"{prefix}errors"] = float(self.num_errors)
        out[f"{prefix}samples_per_s"] = n / self.elapsed_s if self.elapsed_s > 0 else math.nan
        return out


# --------------------------------------------------------------------------- parent side


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, cfg: RewardConfig, names: list[str]):
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aapo_megatron.rewards.worker", str(fd)],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, close_fds=True, env=env,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send((list(sys.path), cfg, names))
        self.pid = self.proc.pid
        self.started = time.monotonic()
        self.ready = False
        self.inflight: deque[int] = deque()
        self.deadline = math.inf

    def exit_code(self) -> Optional[int]:
        """Return code after exit (negative = killed by that signal), waiting up to a second; None if running."""
        try:
            return self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within a second."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class RewardPool:
    """Worker processes scoring (completion, sample) pairs with every configured reward function."""

    def __init__(self, cfg: RewardConfig):
        if cfg.num_workers < 1:
            raise RewardError(f"reward.num_workers must be >= 1, got {cfg.num_workers}")
        if not cfg.functions:
            raise RewardError("reward.functions is empty: name at least one reward function")
        self.cfg = cfg
        self.names = list(cfg.functions)
        for name in self.names:
            resolve_reward(name)  # fail fast with the registry's message, before any process starts
        self.weights = torch.tensor([cfg.functions[n] for n in self.names], dtype=torch.float32)
        self._failure_value = math.nan if cfg.on_failure == "nan" else 0.0
        self._workers: list[_Worker] = [self._spawn() for _ in range(cfg.num_workers)]
        self.totals = {"samples": 0, "timeouts": 0, "crashes": 0, "errors": 0, "restarts": 0}
        """Counters over the pool's lifetime."""

    # ----------------------------------------------------------------------- lifecycle

    def _spawn(self) -> _Worker:
        return _Worker(self.cfg, self.names)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()
        self.totals["restarts"] += 1

    def close(self) -> None:
        """Stop every worker."""
        workers, self._workers = getattr(self, "_workers", []), []
        for w in workers:
            w.stop()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.pid for w in self._workers]

    def wait_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has started (imports done); raise RewardError if one cannot."""
        deadline = time.monotonic() + timeout_s
        while not all(w.ready for w in self._workers):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RewardError(f"reward workers not ready after {timeout_s:.0f}s")
            for conn in wait([w.conn for w in self._workers if not w.ready], timeout=left):
                w = next(w for w in self._workers if w.conn is conn)
                self._receive(w, None, None)

    # ----------------------------------------------------------------------- scoring

    def score(
        self,
        completions: Sequence[str],
        samples: Sequence[Mapping[str, Any]],
        num_tokens: Optional[Sequence[int]] = None,
    ) -> RewardResult:
        """Score N completions; samples[i] is completion i's prompt data (answer, ...). Returns [N, F] rewards."""
        n = len(completions)
        if len(samples) != n:
            raise RewardError(f"score() got {n} completions but {len(samples)} samples")
        if num_tokens is not None and len(num_tokens) != n:
            raise RewardError(f"score() got {n} completions but {len(num_tokens)} num_tokens")
        if (num_tokens is None and "cosine_length" in self.names
                and build_options("cosine_length", self.cfg).length_unit == "tokens"):
            raise RewardError("cosine_length with reward.options.cosine_length.length_unit=tokens needs "
                              "score(..., num_tokens=...)")
        t0 = time.monotonic()
        rows: list[Optional[list[Optional[float]]]] = [None] * n
        state = _BatchState(n)
        pending: deque[int] = deque(range(n))
        try:
            self._run(pending, rows, state, completions, samples, num_tokens)
        except BaseException:
            # Interrupted mid-batch: workers still holding samples would answer into the next batch.
            for w in list(self._workers):
                if w.inflight:
                    self._replace(w)
            raise
        return self._result(rows, state, time.monotonic() - t0)

    def _run(self, pending: deque[int], rows: list, state: "_BatchState", completions: Sequence[str],
             samples: Sequence[Mapping[str, Any]], num_tokens: Optional[Sequence[int]]) -> None:
        while pending or any(w.inflight for w in self._workers):
            self._dispatch(pending, completions, samples, num_tokens)
            now = time.monotonic()
            deadlines = [w.deadline for w in self._workers if w.inflight]
            if any(not w.ready for w in self._workers):
                deadlines.append(now + 1.0)  # wake up to check start-up time-outs
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            for conn in wait([w.conn for w in self._workers], timeout=wait_s):
                w = next((w for w in self._workers if w.conn is conn), None)
                if w is not None:
                    self._receive(w, rows, state, pending)
            now = time.monotonic()
            for w in list(self._workers):
                if w.inflight and now > w.deadline:
                    idx = w.inflight.popleft()
                    state.fail(idx, "timeouts", f"sample {idx}: reward timed out after {self.cfg.timeout_s:g}s "
                                                f"(worker pid {w.pid} killed and replaced)")
                    pending.extendleft(reversed(w.inflight))
                    self._replace(w)
                elif not w.ready and now - w.started > _STARTUP_TIMEOUT_S:
                    raise RewardError(f"reward worker pid {w.pid} did not start within {_STARTUP_TIMEOUT_S:.0f}s")

    def _dispatch(self, pending: deque[int], completions: Sequence[str], samples: Sequence[Mapping[str, Any]],
                  num_tokens: Optional[Sequence[int]]) -> None:
        idle = [w for w in self._workers if w.ready and not w.inflight]
        for w in idle:
            if not pending:
                return
            size = max(1, min(_MAX_CHUNK, math.ceil(len(pending) / (2 * len(self._workers)))))
            chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
            items = [(i, completions[i], samples[i], None if num_tokens is None else int(num_tokens[i])) for i in chunk]
            w.inflight.extend(chunk)
            w.deadline = time.monotonic() + self.cfg.timeout_s
            try:
                w.conn.send(items)
            except (OSError, ValueError):
                pass  # the worker died; the EOF on its pipe is handled by _receive

    def _receive(self, w: _Worker, rows: Optional[list], state: Optional["_BatchState"],
                 pending: Optional[deque[int]] = None) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            code = w.exit_code()
            if not w.ready:
                w.kill()
                raise RewardError(f"reward worker pid {w.pid} exited during start-up (exit code {code})") from None
            if w.inflight and state is not None:
                idx = w.inflight.popleft()
                state.fail(idx, "crashes", f"sample {idx}: reward worker pid {w.pid} died (exit code {code}); replaced")
                pending.extendleft(reversed(w.inflight))
            w.inflight.clear()
            self._replace(w)
            return
        kind = msg[0]
        if kind == "ready":
            w.ready = True
        elif kind == "fatal":
            w.kill()
            raise RewardError(f"reward worker could not start:\n{msg[1]}")
        elif kind == "ok":
            _, idx, row, errors = msg
            if not w.inflight or w.inflight[0] != idx:
                raise RewardError(f"reward worker pid {w.pid} answered sample {idx} out of order")
            w.inflight.popleft()
            w.deadline = time.monotonic() + self.cfg.timeout_s
            rows[idx] = row
            if errors:
                state.fail(idx, "errors", f"sample {idx}: " + "; ".join(errors))

    def _result(self, rows: list, state: "_BatchState", elapsed: float) -> RewardResult:
        n, f = len(rows), len(self.names)
        out = torch.full((n, f), self._failure_value, dtype=torch.float32)
        for i, row in enumerate(rows):
            if row is not None:
                out[i] = torch.tensor([self._failure_value if v is None else v for v in row], dtype=torch.float32)
        self.totals["samples"] += n
        for key in ("timeouts", "crashes", "errors"):
            self.totals[key] += state.counts[key]
        for message in state.messages:
            logger.warning(message)
        return RewardResult(
            rewards=out, names=list(self.names), weights=self.weights.clone(), failed=state.failed,
            num_timeouts=state.counts["timeouts"], num_crashes=state.counts["crashes"],
            num_errors=state.counts["errors"], messages=state.messages, elapsed_s=elapsed,
        )


class _BatchState:
    """Failure bookkeeping of one score() call."""

    def __init__(self, n: int):
        self.failed = torch.zeros(n, dtype=torch.bool)
        self.counts = {"timeouts": 0, "crashes": 0, "errors": 0}
        self.messages: list[str] = []

    def fail(self, idx: int, kind: str, message: str) -> None:
        self.failed[idx] = True
        self.counts[kind] += 1
        if len(self.messages) < _MAX_MESSAGES:
            self.messages.append(message)
