"""Scratch directories carry their owner's pid; creating one removes those whose owner has exited."""

import os
import subprocess
import sys
import time

from aapo_megatron.rollout.scratch_dirs import MIN_AGE_S, owned_tempdir, owner_pid, sweep_dead

PREFIX = "aapo-test-scratch-"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _make(base, name, age_s=0.0):
    path = base / name
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "slot0.bin").write_bytes(b"x" * 64)
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path


def test_owned_tempdir_sweeps_only_old_directories_of_dead_owners(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = _make(tmp_path, f"{PREFIX}{dead}-abc", age_s=MIN_AGE_S + 5)
        young = _make(tmp_path, f"{PREFIX}{dead}-young")  # just written: maybe another PID namespace's
        alive = _make(tmp_path, f"{PREFIX}{live.pid}-def", age_s=MIN_AGE_S + 5)
        unnamed = _make(tmp_path, f"{PREFIX}legacy", age_s=MIN_AGE_S + 5)  # no pid: never touched
        other = _make(tmp_path, f"other-{dead}-x", age_s=MIN_AGE_S + 5)

        new = owned_tempdir(PREFIX, str(tmp_path))

        assert not stale.exists()
        assert young.exists() and alive.exists() and unnamed.exists() and other.exists()
        assert os.path.isdir(new) and owner_pid(os.path.basename(new), PREFIX) == os.getpid()
        # Our own directory is never swept, whatever its age.
        os.utime(new, (0, 0))
        assert sweep_dead(str(tmp_path), PREFIX) == []
    finally:
        live.kill()
        live.wait()
    assert sweep_dead(str(tmp_path), PREFIX) == [str(alive)]  # its owner has now exited


def test_owner_pid_parses_only_pid_names():
    assert owner_pid("aapo-wslots-123-k3j", "aapo-wslots-") == 123
    assert owner_pid("aapo-wslots-k3j1x9", "aapo-wslots-") is None  # the names before pids were added
    assert owner_pid("aapo-wslots-123", "aapo-wslots-") is None
    assert owner_pid("aapo-wsync-123-x", "aapo-wslots-") is None
