"""Shared steps of the Slurm tests: submit slurm/aapo_70b.sh the local-test way, read its outputs."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional, Sequence

from tests.slurm.cluster import FINAL_STATES, LocalSlurmCluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT_70B = os.path.join(REPO, "slurm", "aapo_70b.sh")
# The documented local-test invocation: one CPU node, 2 tasks, no GPUs.
LOCAL_SBATCH_ARGS = ("--nodes=1", "--ntasks=2", "--gpus-per-node=0")


def submit_70b(cluster: LocalSlurmCluster, out_dir: str, env: Mapping[str, str],
               sbatch_args: Sequence[str] = ()) -> tuple[int, str]:
    """sbatch the real slurm/aapo_70b.sh from the repository root; returns (job id, path of the job's log)."""
    log = os.path.join(out_dir, "job.out")
    job_env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    job = cluster.sbatch(SCRIPT_70B, [*LOCAL_SBATCH_ARGS, f"--output={log}", *sbatch_args], env=job_env, cwd=REPO)
    return job, log


def read_text(path: str) -> str:
    """File contents, or '' if it does not exist yet."""
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def read_jsonl(path: str) -> list[dict]:
    """Parsed lines of a JSONL file ([] if missing)."""
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, log: Optional[str] = None, poll: float = 0.5,
             cluster: Optional[LocalSlurmCluster] = None, job: Optional[int] = None):
    """Poll `predicate()` until truthy (returned). Raise AssertionError with `what` and the job log on timeout,
    or as soon as `job` (if given) has ended: what we wait for will not happen any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None:
            state = cluster.job(job).get("JobState")
            if state in FINAL_STATES:
                raise AssertionError(f"job {job} ended ({state}) while waiting for {what}\n{_log_tail(log)}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{_log_tail(log)}")


def _log_tail(log: Optional[str], lines: int = 60) -> str:
    return "--- job log ---\n" + "\n".join(read_text(log).splitlines()[-lines:]) if log else ""


def release_requeued(cluster: LocalSlurmCluster, job: int, restarts: int, log: str, timeout: float = 120.0) -> dict:
    """Wait until `job` is pending again after its `restarts`-th requeue; returns the job record seen then.

    Slurm holds a requeued job until its old credential has expired (BeginTime = requeue + cred_expire, 10 s on
    the test cluster). Forcing an earlier start (`scontrol update StartTime=now`) makes slurmctld kill the new
    batch job with "Job credential revoked", so the tests wait like a real cluster would.
    """
    def pending():
        info = cluster.job(job)
        return info if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) >= restarts else None

    return wait_for(pending, timeout, f"job {job} to be requeued ({restarts})", log, cluster=cluster, job=job)
