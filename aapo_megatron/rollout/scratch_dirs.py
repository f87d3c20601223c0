"""Scratch directories named after the process that owns them, and a sweep for those of dead processes.

Weight-sync slots live in /dev/shm (RAM) and vLLM's socket files in the temp directory. A run that is killed
(SIGKILL, OOM killer, a Slurm time limit) cannot remove them, so every new directory is named
`<prefix><pid>-<random>` and creating one first removes the same prefix's directories whose process is gone:

    path = owned_tempdir("aapo-wslots-", "/dev/shm")     # /dev/shm/aapo-wslots-4242-k3j1x9
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Optional

MIN_AGE_S = 60.0
"""A dead owner's directory is removed only once it is this old (seconds since its last change), which leaves
alone directories of processes in another PID namespace that just wrote them."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str, prefix: str) -> Optional[int]:
    """The pid in `<prefix><pid>-<random>`, or None when `name` is not such a directory name."""
    if not name.startswith(prefix):
        return None
    head, sep, _ = name[len(prefix):].partition("-")
    return int(head) if sep and head.isdigit() else None


def sweep_dead(base: str, prefix: str, min_age_s: float = MIN_AGE_S) -> list[str]:
    """Remove `base/<prefix><pid>-*` directories whose process has exited; returns the removed paths."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        pid = owner_pid(name, prefix)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(base, name)
        try:
            if now - os.stat(path).st_mtime < min_age_s:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def owned_tempdir(prefix: str, base: Optional[str] = None) -> str:
    """A new directory `base/<prefix><this pid>-<random>`, after sweeping the prefix's dead owners' ones."""
    base = base or tempfile.gettempdir()
    sweep_dead(base, prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
