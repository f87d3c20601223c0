"""Trainer checkpoints: atomic, verifiable directories with a `latest` pointer and keep-last-K.

Layout under the checkpoint root:

    step_00000010/            one complete checkpoint
        ...payload...         written by the caller (Megatron dist checkpoint, trainer state, caches)
        MANIFEST.json         written last: step, relative path -> size and sha256 of every payload file
    latest                    text file: the directory name of the newest complete checkpoint
    step_00000020.tmp/        an in-progress save (never read; removed on the next save)

A save writes into `<name>.tmp/`, fsyncs every payload file and directory, writes
MANIFEST.json, renames the directory, fsyncs the root, and only then replaces
`latest` (both atomic on POSIX). A checkpoint is valid only if its manifest exists
and every listed file exists with the listed size and sha256, so a save killed at
any point, a truncated file or a same-size corrupted one is detected and skipped in
favour of the newest older valid checkpoint. A save that fails (disk full,
permission denied, read-only file system) raises `CheckpointSaveError` naming the
path; its partial directory is removed and `latest` still names the previous one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from aapo_megatron.checkpoint.errors import CheckpointError, CheckpointSaveError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_HASH_CHUNK = 4 * 1024 * 1024


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


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(root: str) -> dict[str, dict]:
    """relative path -> {"size": bytes, "sha256": hex} of every file under `root` but the manifest."""
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel != MANIFEST:
                files[rel] = {"size": os.path.getsize(full), "sha256": file_sha256(full)}
    return files


def _fsync_path(path: str) -> None:
    """fsync a file or a directory (its entries); raises OSError (e.g. EIO, ENOSPC on a full disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under `root`, deepest first, then `root` itself."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_path(path)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot fsync a directory
            raise


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def verify(path: str, checksums: bool = True) -> CheckpointInfo:
    """Check a checkpoint directory against its manifest (sizes, and sha256 if `checksums`); raise
    CheckpointError saying what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path} is partial: {MANIFEST} is missing (the save did not finish)")
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        step = int(manifest["step"])
        files = {rel: entry if isinstance(entry, dict) else {"size": int(entry)}  # older manifests: sizes only
                 for rel, entry in dict(manifest["files"]).items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({exc})") from None
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is missing")
        actual = os.path.getsize(full)
        if actual != entry["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} has {actual} bytes, "
                                  f"the manifest says {entry['size']}")
    if checksums:
        for rel, entry in files.items():
            if "sha256" in entry and file_sha256(os.path.join(path, rel)) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {rel} does not match its sha256 in {MANIFEST} "
                                      f"(same size, different bytes)")
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
        """Write a checkpoint for `step`: write_payload(tmp_dir) fills it; then it is sealed and published.

        An OSError on the way (disk full, permission denied, read-only file system) becomes a
        CheckpointSaveError naming the path; the partial directory is removed and `latest` is not moved.
        """
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        try:
            if self.is_writer:
                for stale in self._stale_tmp_dirs():
                    shutil.rmtree(stale, ignore_errors=True)
                os.makedirs(tmp, exist_ok=True)
            self._barrier()
            write_payload(tmp)
            self._barrier()
            if self.is_writer:
                self._seal_and_publish(step, tmp, final)
        except OSError as exc:
            raise self._save_failed(step, tmp, exc) from exc
        except BaseException as exc:  # Megatron's writers report an OSError as text, in torch's CheckpointException
            if not isinstance(exc, Exception) and type(exc).__name__ != "CheckpointException":
                raise  # KeyboardInterrupt, SystemExit
            cause = _os_error_in(exc) or (_probe_write(tmp) if self.is_writer or os.path.isdir(tmp) else None)
            if cause is None:
                raise
            raise self._save_failed(step, tmp, cause) from exc
        self._barrier()
        return CheckpointInfo(step=step, path=final)

    def _seal_and_publish(self, step: int, tmp: str, final: str) -> None:
        _fsync_tree(tmp)  # the payload is on disk before the manifest says it is complete
        manifest = {"step": step, "files": _payload_files(tmp)}
        _write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)  # the rename is durable before `latest` names it
        _write_text_atomic(os.path.join(self.root, LATEST), step_dir_name(step) + "\n")
        _fsync_dir(self.root)
        self._prune()

    def _save_failed(self, step: int, tmp: str, exc: OSError) -> CheckpointSaveError:
        where = exc.filename or tmp
        if self.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs for the next try
        previous = self._latest_name()
        kept = f"the previous checkpoint {os.path.join(self.root, previous)} is kept and stays latest" if previous \
            else "there is no earlier checkpoint"
        return CheckpointSaveError(f"saving the checkpoint of step {step} failed at {where}: "
                                   f"{exc.strerror or exc} [errno {exc.errno}]; {kept}. Free space or fix the "
                                   f"permissions of {self.root} (checkpoint.dir), then resume")

    def _latest_name(self) -> Optional[str]:
        try:
            with open(os.path.join(self.root, LATEST)) as fh:
                return fh.read().strip() or None
        except OSError:
            return None

    def _stale_tmp_dirs(self) -> list[str]:
        return [os.path.join(self.root, n) for n in os.listdir(self.root) if n.endswith(".tmp")]

    def _prune(self) -> None:
        complete = self.list_valid(checksums=False)  # sizes only: hashing every kept checkpoint on each save is slow
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

    def list_valid(self, checksums: bool = True) -> list[CheckpointInfo]:
        """Checkpoints that pass `verify`, oldest first."""
        valid = []
        for info in self.list_all():
            try:
                valid.append(verify(info.path, checksums))
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


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError an exception was raised from (its __cause__/__context__ chain or its args), if any."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        stack += [e.__cause__, e.__context__] + [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        stack += [v for v in getattr(e, "failures", {}).values() if isinstance(v, BaseException)]  # torch DCP
    return None


def _probe_write(directory: str, nbytes: int = 1024 * 1024) -> Optional[OSError]:
    """The OSError that writing and fsyncing `nbytes` into `directory` raises now (disk full, read-only), or None."""
    probe = os.path.join(directory, f".write_probe.{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * nbytes)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None
