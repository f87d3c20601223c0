"""The Slurm launcher (slurm/aapo_70b.sh + slurm/common.sh) on a real local cluster, with a probe program.

`tests/slurm/rank_probe.py` runs in place of aapo-train (AAPO_TRAIN_CMD) so these tests check the script's own
behaviour quickly and independently of the trainer: srun starts one rank per task, the ranks rendezvous through
the project's init_distributed from Slurm's environment, arguments and overrides arrive, a signal that reaches
only the batch shell is passed on, exit code 3 requeues the job (and only when allowed). The end-to-end runs
with the real trainer are in test_multinode.py.
"""

from __future__ import annotations

import os

import pytest

from tests.slurm.helpers import read_jsonl, read_text, release_requeued, submit_70b, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROBE = "python tests/slurm/rank_probe.py"


def _env(tmp_path, **extra):
    return {
        "AAPO_CONFIG": "configs/quickstart_cpu.yaml",
        "AAPO_TRAIN_CMD": PROBE,
        "AAPO_RUN_DIR": str(tmp_path / "run"),
        "AAPO_EXTRA_ARGS": "--set parallel.tensor_model_parallel_size=2",
        **extra,
    }


def test_harness_runs_a_two_task_job(slurm_cluster, tmp_path):
    script = tmp_path / "two_tasks.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS on $(hostname -s)\"'\n")
    out = tmp_path / "two_tasks.out"
    job = slurm_cluster.sbatch(str(script), ["--ntasks=2", f"--output={out}"])
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    host = slurm_cluster.hostname
    assert sorted(out.read_text().splitlines()) == [f"task 0 of 2 on {host}", f"task 1 of 2 on {host}"]


def test_batch_shell_signal_is_forwarded_and_exit_3_requeues(slurm_cluster, tmp_path):
    """`scancel --batch --signal=USR1` reaches only the batch shell (like --signal=B:USR1@300); the script passes
    it to the ranks, they exit 3, the script requeues, and the second run (restart 1) completes."""
    env = _env(tmp_path, AAPO_EXTRA_ARGS="--set parallel.tensor_model_parallel_size=2 --wait-for-signal")
    job, log = submit_70b(slurm_cluster, str(tmp_path), env)
    ranks_file = str(tmp_path / "run" / "ranks.jsonl")
    # The probe creates the run dir after rendezvous, with its signal handlers already installed.
    wait_for(lambda: os.path.isdir(tmp_path / "run"), 240, "the ranks to start", log,
             cluster=slurm_cluster, job=job)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    pending = release_requeued(slurm_cluster, job, 1, log)
    assert pending["Restarts"] == "1"
    info = slurm_cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", read_text(log)
    runs = read_jsonl(ranks_file)
    for restart in (0, 1):
        ranks = sorted((r for r in runs if r["restart"] == restart), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranks] == [0, 1], runs
        for r in ranks:
            # srun started one rank per task; they found each other from Slurm's variables + the script's
            # MASTER_ADDR/MASTER_PORT and all-reduced 1 + 2 over gloo.
            assert r["world_size"] == 2 and r["launcher"] == "slurm" and r["local_rank"] == r["rank"], r
            assert r["sum"] == 3.0 and r["master"] == ranks[0]["master"], r
            assert r["master"].startswith(f"{slurm_cluster.hostname}:"), r
            assert r["resume"] == "auto" and r["run_dir"] == str(tmp_path / "run") and r["omp"] == "1", r
            assert r["usr1_blocked_at_start"] is True, r
            if restart == 0:
                assert r["signal"] == "SIGUSR1" and r["helper_survived"] is True, r
    # Each incarnation rendezvouses on its own port (the old one may linger in TIME_WAIT).
    assert {r["master"] for r in runs if r["restart"] == 0} != {r["master"] for r in runs if r["restart"] == 1}
    text = read_text(log)
    assert "world 2 (TP 2, PP 1)" in text
    assert "batch shell received SIGUSR1" in text
    assert f"requeueing job {job} (restart 1)" in text
    # Slurm's completion log: the first run ended in a requeue (back to PENDING), the second completed.
    states = [r["JobState"] for r in slurm_cluster.completions(job)]
    assert states == ["PENDING", "COMPLETED"], states


def test_no_requeue_when_disabled(slurm_cluster, tmp_path):
    env = _env(tmp_path, AAPO_REQUEUE="0",
               AAPO_EXTRA_ARGS="--set parallel.tensor_model_parallel_size=2 --wait-for-signal")
    job, log = submit_70b(slurm_cluster, str(tmp_path), env)
    wait_for(lambda: os.path.isdir(tmp_path / "run"), 240, "the ranks to start", log,
             cluster=slurm_cluster, job=job)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])  # to the steps only: the default delivery
    info = slurm_cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", read_text(log)
    assert info["Restarts"] == "0"
    assert "AAPO_REQUEUE=0: not requeueing" in read_text(log)
    ranks = read_jsonl(str(tmp_path / "run" / "ranks.jsonl"))
    # Slurm signalled every process of the step; the ranks' helper processes lived on (the signal shield).
    assert len(ranks) == 2 and all(r["signal"] == "SIGUSR1" and r["helper_survived"] for r in ranks), ranks


def test_bad_override_fails_before_srun(slurm_cluster, tmp_path):
    env = _env(tmp_path, AAPO_EXTRA_ARGS="--set algorithm.delta_hihg=0.3")
    job, log = submit_70b(slurm_cluster, str(tmp_path), env)
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", read_text(log)
    text = read_text(log)
    assert "unknown key 'algorithm.delta_hihg' (did you mean 'algorithm.delta_high'?)" in text
    assert "the configuration is invalid" in text
    assert not (tmp_path / "run").exists()
