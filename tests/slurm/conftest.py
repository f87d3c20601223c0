"""Fixtures for the Slurm tests: one private local cluster per test session, stopped by pid at the end."""

from __future__ import annotations

import os

import pytest

from tests.slurm.cluster import LocalSlurmCluster, SlurmUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started LocalSlurmCluster (installs slurm-wlm + munge if needed; skips if that is impossible)."""
    cluster = LocalSlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
        leftovers = cluster.stop(check=False)
        assert not leftovers, f"processes of the test Slurm cluster still running after stop: {leftovers}"
        for name in cluster.pid_files:
            pid = cluster.pid(name)
            assert pid is None or not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid), \
                f"{name} (pid {pid}) still running after stop"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return b") Z " in fh.read()
    except OSError:
        return True
