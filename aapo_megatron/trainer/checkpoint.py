"""Atomic, verifiable checkpoint directories with a `latest` pointer and keep-last-K.

Layout under the checkpoint root:

    step_00000010/            one complete checkpoint
        ...payload...         written by the caller (Megatron dist checkpoint, trainer state, caches)
        MANIFEST.json         written last: step, relative path -> size of every payload file
    latest                    text file: the directory name of the newest complete checkpoint
    step_00000020.tmp/        an in-progress save (never read; removed on the next save)

A save writes into `<name>.tmp/`, writes MANIFEST.json, then renames the directory
and replaces `latest` (both atomic on POSIX). A checkpoint is valid only if its
manifest exists and every listed file exists with the listed size, so a save
killed at any point, or a truncated file, is detected and skipped in favour of
the newest older valid checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory on disk."""

    step: int
    """Trainer step the checkpoint was taken after."""
    path: str
    """Absolute directory path."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint for `step`."""
    return f"step_{step:08d}"


def _payload_files(root: str) -> dict[str, int]:
    sizes = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(full)
    return sizes


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def verify(path: str) -> CheckpointInfo:
    """Check a checkpoint directory against its manifest; raise CheckpointError saying what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} is partial: {MANIFEST} is missing (the save did not finish)")
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        step = int(manifest["step"])
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({exc})") from None
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} has {actual} bytes, the manifest says {size}")
    return CheckpointInfo(step=step, path=os.path.abspath(path))


class CheckpointManager:
    """Creates, verifies, lists and prunes checkpoints under one root directory.

    In a distributed job every rank calls `save` (the payload writer may be
    collective); only the rank with `is_writer=True` finalises (manifest, rename,
    `latest`, pruning). `barrier` is called between the payload and finalisation.
    """

    def __init__(self, root: str, keep_last: int = 2, is_writer: bool = True,
                 barrier: Optional[Callable[[], None]] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = os.path.abspath(root)
        self.keep_last = keep_last
        self.is_writer = is_writer
        self._barrier = barrier or (lambda: None)
        os.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, write_payload: Callable[[str], None]) -> CheckpointInfo:
        """Write a checkpoint for `step`: write_payload(tmp_dir) fills it; then it is sealed and published."""
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        if self.is_writer:
            for stale in self._stale_tmp_dirs():
                shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        self._barrier()
        write_payload(tmp)
        self._barrier()
        if self.is_writer:
            manifest = {"step": step, "files": _payload_files(tmp)}
            _write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving the same step (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_text_atomic(os.path.join(self.root, LATEST), step_dir_name(step) + "\n")
            self._prune()
        self._barrier()
        return CheckpointInfo(step=step, path=final)

    def _stale_tmp_dirs(self) -> list[str]:
        return [os.path.join(self.root, n) for n in os.listdir(self.root) if n.endswith(".tmp")]

    def _prune(self) -> None:
        complete = self.list_valid()
        for info in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(info.path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def list_all(self) -> list[CheckpointInfo]:
        """Every step_* directory, oldest first (valid or not)."""
        found = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            if m:
                found.append(CheckpointInfo(step=int(m.group(1)), path=os.path.join(self.root, name)))
        return sorted(found, key=lambda c: c.step)

    def list_valid(self) -> list[CheckpointInfo]:
        """Checkpoints that pass `verify`, oldest first."""
        valid = []
        for info in self.list_all():
            try:
                valid.append(verify(info.path))
            except CheckpointError:
                pass
        return valid

    def latest(self) -> Optional[CheckpointInfo]:
        """Newest valid checkpoint: the one `latest` names if it verifies, else the newest older valid one."""
        pointer = os.path.join(self.root, LATEST)
        candidates = list(reversed(self.list_all()))
        if os.path.isfile(pointer):
            with open(pointer) as fh:
                named = fh.read().strip()
            named_path = os.path.join(self.root, named)
            candidates.sort(key=lambda c: c.path != named_path)  # try the named one first
        for info in candidates:
            try:
                return verify(info.path)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None

    def resolve(self, resume: Optional[str]) -> Optional[CheckpointInfo]:
        """Map `checkpoint.resume` (None, "auto" or a path) to a verified checkpoint or None."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        return verify(resume)
