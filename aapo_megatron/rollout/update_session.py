"""Weight-update sessions of the rollout server: one at a time, heartbeats, takeover; and the same-host file
transport's staging, confined and complete (the network transport's data plane is `server_transfer.py`).

The trainer writes safetensors bucket files under the server's weight directory (`--weight-dir`) and names
each by its path relative to that directory; nothing outside it is read (no `..`, no absolute paths, no
symlinks). Each bucket is staged (hard-linked, else copied) into a private directory of the session, so the
trainer may delete its file at once. Nothing reaches the engine until commit, and commit refuses a session
whose buckets do not hold every tensor of the served checkpoint: the old weights stay served.

A session belongs to one trainer, which sends heartbeats; `begin` takes over a session silent for longer
than `takeover_timeout_s`, so a restarted trainer does not wait for a dead one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from safetensors import safe_open


STAGING_PREFIX = ".aapo-staging-"


class SessionError(Exception):
    """A refused session request: HTTP `status` and a message naming the cause."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def checkpoint_tensor_names(model_dir: str) -> set[str]:
    """Tensor names of an HF checkpoint directory (every *.safetensors file's header)."""
    names: set[str] = set()
    for entry in sorted(os.listdir(model_dir)):
        if entry.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, entry), framework="pt", device="cpu") as f:
                names.update(f.keys())
    return names


def required_tensor_names(model_dir: str) -> set[str]:
    """The tensors a full weight update must deliver: the checkpoint's, less a tied `lm_head.weight` (the
    trainer never sends it; vLLM ties it). Empty when `model_dir` is not a local HF directory (no check)."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return set()
    with open(os.path.join(model_dir, "config.json")) as fh:
        tied = bool(json.load(fh).get("tie_word_embeddings", False))
    names = checkpoint_tensor_names(model_dir)
    if tied:
        names.discard("lm_head.weight")
    return names


def confined_file(root: str, relative: str) -> str:
    """The real path of regular file `relative` inside directory `root`; SessionError(400) for anything else."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\x00" in relative:
        raise SessionError(400, f"bucket file {relative!r} must be a path relative to the server's weight directory")
    parts = relative.replace("\\", "/").split("/")
    if parts[0].startswith(STAGING_PREFIX):
        raise SessionError(400, f"bucket file {relative!r}: the server's staging directories are refused")
    if any(p in ("", ".", "..") for p in parts):
        raise SessionError(400, f"bucket file {relative!r}: '..', '.' and empty path parts are refused")
    real_root = os.path.realpath(root)
    path = os.path.join(real_root, *parts)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SessionError(400, f"bucket file {relative!r} not found in the server's weight directory") from None
    if stat.S_ISLNK(st.st_mode):
        raise SessionError(400, f"bucket file {relative!r} is a symlink; refused")
    if not stat.S_ISREG(st.st_mode):
        raise SessionError(400, f"bucket file {relative!r} is not a regular file")
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise SessionError(400, f"bucket file {relative!r} resolves outside the server's weight directory")
    return path


@dataclass
class UpdateSession:
    """One trainer's update in progress: staged bucket files and the tensor names they hold."""

    id: str
    staging: Optional[str]
    last_seen: float
    transport: str = "shm"
    """"shm" (bucket files staged here) or a broadcast transport (buckets staged in the engine)."""
    files: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)

    def close(self) -> None:
        """Remove the staged files."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


class SessionTable:
    """At most one open update session; heartbeats, takeover of a silent one, staging and the completeness check."""

    def __init__(self, weight_dir: str, expected: set[str], takeover_timeout_s: float):
        self.weight_dir = os.path.realpath(weight_dir)
        self.expected = set(expected)
        self.takeover_timeout_s = float(takeover_timeout_s)
        self.session: Optional[UpdateSession] = None

    def begin(self, transport: str = "shm") -> tuple[str, Optional[str]]:
        """Open a session; returns (id, id of a silent session taken over or None). 409 while one is alive."""
        taken = None
        now = time.monotonic()
        if self.session is not None:
            silent = now - self.session.last_seen
            if silent <= self.takeover_timeout_s:
                raise SessionError(409, f"another weight update session is active (last heard from {silent:.1f} s "
                                        f"ago; a session silent for {self.takeover_timeout_s:g} s is taken over)")
            taken = self.session.id
            self.drop()
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.weight_dir) if transport == "shm" else None
        self.session = UpdateSession(id=secrets.token_hex(8), staging=staging, last_seen=now, transport=transport)
        return self.session.id, taken

    def get(self, session_id: object) -> UpdateSession:
        """The open session with this id (its heartbeat renewed); 409 otherwise."""
        s = self.session
        if not isinstance(session_id, str) or s is None or not secrets.compare_digest(session_id, s.id):
            raise SessionError(409, f"no active weight update session {session_id!r} (it may have been taken over)")
        s.last_seen = time.monotonic()
        return s

    def stage(self, session_id: object, relative: object) -> int:
        """Stage one bucket file named relative to the weight directory; returns its tensor count."""
        s = self.get(session_id)
        if s.staging is None:
            raise SessionError(400, f"session {s.id} moves its weights by {s.transport}: 'load' (a bucket file) is "
                                    f"refused")
        src = confined_file(self.weight_dir, relative)  # type: ignore[arg-type]
        dst = os.path.join(s.staging, f"{len(s.files):05d}.safetensors")
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copyfile(src, dst, follow_symlinks=False)
        try:
            with safe_open(dst, framework="pt", device="cpu") as f:
                names = list(f.keys())
        except Exception as exc:  # noqa: BLE001 - a corrupt bucket is the client's error
            os.remove(dst)
            raise SessionError(400, f"bucket file {relative!r} is not a safetensors file: {exc}") from None
        s.files.append(dst)
        s.names.update(names)
        return len(names)

    def missing(self, session: UpdateSession) -> list[str]:
        """Checkpoint tensors that no staged bucket delivered."""
        return sorted(self.expected - session.names)

    def drop(self) -> None:
        """Close the open session (if any) and remove its staged files."""
        if self.session is not None:
            self.session.close()
            self.session = None


def describe_missing(missing: list[str], expected: int) -> str:
    """A short message naming the first missing tensors."""
    head = json.dumps(missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"the update delivered {expected - len(missing)} of {expected} tensors; missing {head}{more}"
