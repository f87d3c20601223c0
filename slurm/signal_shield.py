"""Run a Python program so that SIGUSR1 reaches its own handler and never its child processes.

    python slurm/signal_shield.py aapo-train --config ...           # a Python console script on PATH
    python slurm/signal_shield.py python tests/slurm/rank_probe.py  # a script run by the interpreter
    python slurm/signal_shield.py -m some.module ...                # a module, like `python -m`

Why: Slurm delivers the pre-deadline signal (`--signal=USR1@300`, `scancel --signal=USR1`) to every process
of a job step, not only to the rank it launched. The trainer's helpers (vLLM's engine core and workers, the
reward workers) are started after the trainer installed its SIGUSR1 handler, so they run with the default
action, which terminates them, and the trainer then fails instead of saving a checkpoint.

How: before the program runs, SIGUSR1 is blocked in the main thread. Every thread and child process created
afterwards inherits the block, so the children never see the signal. One watcher thread takes the signal with
sigwait and calls the Python handler the program installed with `signal.signal(SIGUSR1, fn)`. The handler runs
on the watcher thread, so it must only record the request (the trainer's StopRequest sets a flag). A signal
that arrives before the program has installed a handler is held until it does. A program that is not Python
is exec'd with SIGUSR1 ignored instead.
"""

from __future__ import annotations

import os
import runpy
import shutil
import signal
import sys
import threading
import time

SHIELDED = signal.SIGUSR1


def _deliver() -> None:
    """Watcher thread: wait for SIGUSR1 and call the program's handler (holding the signal until there is one)."""
    while True:
        signal.sigwait({SHIELDED})
        while True:
            handler = signal.getsignal(SHIELDED)
            if callable(handler):
                handler(SHIELDED, None)
                break
            time.sleep(0.2)


def _python_script(path: str | None) -> bool:
    """True if `path` is a file starting with a Python shebang (console scripts) or ending in .py."""
    if not path or not os.path.isfile(path):
        return False
    if path.endswith(".py"):
        return True
    with open(path, "rb") as fh:
        first = fh.readline(256)
    return first.startswith(b"#!") and b"python" in first


def main(argv: list[str]) -> int:
    """Run `argv` (see the module docstring) shielded; returns its exit code (or does not return)."""
    if not argv:
        print("usage: signal_shield.py PROGRAM [ARGS...] | python SCRIPT [ARGS...] | -m MODULE [ARGS...]",
              file=sys.stderr)
        return 2
    if os.path.basename(argv[0]).startswith("python") and len(argv) > 1:
        argv = argv[1:]  # "python script.py ..." / "python -m module ...": run it in this interpreter
    module = argv[1] if argv[0] == "-m" and len(argv) > 1 else None
    path = None
    if module is None:
        path = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
        if not _python_script(path):
            signal.signal(SHIELDED, signal.SIG_IGN)  # inherited across exec, unlike a handler
            os.execvp(argv[0], argv)

    signal.pthread_sigmask(signal.SIG_BLOCK, {SHIELDED})
    threading.Thread(target=_deliver, name="usr1-shield", daemon=True).start()
    if module is not None:
        sys.argv = [module, *argv[2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [path, *argv[1:]]
        sys.path[0] = os.path.dirname(os.path.abspath(path))
        runpy.run_path(path, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
