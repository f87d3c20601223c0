"""Reward worker process: `python -m aapo_megatron.rewards.worker FD` serves one RewardPool over a socket.

A fresh interpreter (not a fork of the trainer): it imports only the reward code, not torch, Megatron or
vLLM, and nothing of the parent's threads or CUDA state. Protocol over the multiprocessing Connection:
parent -> (sys_path, RewardConfig, names); worker resolves the functions, runs their optional
`warmup()` (slow imports), then -> ("ready", pid) or ("fatal", traceback);
parent -> [(idx, completion, sample, num_tokens), ...] chunks, or None to stop;
worker -> ("ok", idx, row, errors) per sample, in order.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any, Optional, Sequence


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the parent exits, so a hung worker cannot outlive the pool."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def score_one(fns: Sequence[Any], names: Sequence[str], x: Any) -> tuple[list[Optional[float]], list[str]]:
    """Run every reward function on one RewardInput: (row with None where a function raised or returned +-inf,
    error messages). NaN passes through: it means the function does not apply to the sample."""
    row: list[Optional[float]] = []
    errors: list[str] = []
    for name, fn in zip(names, fns):
        try:
            value = float(fn(x))
        except Exception as exc:  # a reward function bug must not take the worker down
            row.append(None)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if math.isinf(value):  # no advantage can be computed from it: a failure of that function, like raising
            row.append(None)
            errors.append(f"{name}: returned {value} (a reward must be finite; NaN means 'does not apply')")
            continue
        row.append(value)
    return row, errors


def serve(conn: Connection) -> None:
    """Worker loop: read the setup, resolve the functions, say ready, then score chunks until None or EOF."""
    sys_path, cfg, names = conn.recv()
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        from aapo_megatron.rewards.registry import RewardInput, resolve_reward
        import aapo_megatron.rewards.equivalence  # noqa: F401  (math-verify, for RewardInput.correct(): before any deadline)

        fns = [resolve_reward(n) for n in names]
        for fn in fns:
            warmup = getattr(fn, "warmup", None)
            if callable(warmup):
                warmup()
    except BaseException:
        conn.send(("fatal", traceback.format_exc(limit=4)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for idx, completion, sample, num_tokens in msg:
            row, errors = score_one(fns, names, RewardInput(completion, sample, cfg, num_tokens))
            conn.send(("ok", idx, row, errors))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: argv[0] is the inherited socket fd."""
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    sock = socket.socket(fileno=int(args[0]))
    conn = Connection(sock.detach())
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
