"""End to end: the real slurm/aapo_70b.sh runs the real aapo-train on a local one-node Slurm cluster.

The documented local-test invocation (`AAPO_CONFIG=configs/quickstart_cpu.yaml sbatch --nodes=1 --ntasks=2
--gpus-per-node=0 slurm/aapo_70b.sh`) with TP=2 and a few steps; then the pre-deadline signal, the checkpoint
it triggers, the requeue, and the resumed run continuing from that checkpoint.
"""

from __future__ import annotations

import os

import pytest

from aapo_megatron.checkpoint.manager import LATEST, MANIFEST, verify
from tests.slurm.helpers import read_jsonl, read_text, release_requeued, submit_70b, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A small, fast version of the quickstart: TP=2 over the 2 tasks, a short SFT warm start, small batches.
TINY = (
    "--set parallel.tensor_model_parallel_size=2 --set trainer.sft_steps=4 --set trainer.eval_every=0 "
    "--set data.train_size=200 --set data.eval_size=20 --set data.prompts_per_step=4 "
    "--set rollout.num_generations=4 --set logging.plots=false --set logging.tensorboard=false"
)


def _env(tmp_path, extra: str) -> dict:
    return {
        "AAPO_CONFIG": "configs/quickstart_cpu.yaml",
        "AAPO_RUN_DIR": str(tmp_path / "run"),
        "AAPO_EXTRA_ARGS": f"{TINY} {extra}",
    }


def _steps(run_dir) -> list[int]:
    """RL steps in metrics.jsonl (the SFT warm start logs steps <= 0)."""
    return [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["step"] > 0]


def _checkpoints(ckpt_dir) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))


def test_sbatch_70b_script_runs_the_quickstart(slurm_cluster, tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    job, log = submit_70b(slurm_cluster, str(tmp_path),
                          _env(tmp_path, "--set trainer.steps=3 --set checkpoint.save_every=2"))
    info = slurm_cluster.wait_job(job, timeout=900, poll=2.0)
    text = read_text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert "world 2 (TP 2, PP 1)" in text and "training finished (exit 0)" in text
    assert _steps(run_dir) == [1, 2, 3]
    # Saved at step 2 (save_every) and at the end; `latest` names the newest, and it verifies.
    assert _checkpoints(ckpt_dir) == ["step_00000002", "step_00000003"]
    assert (ckpt_dir / LATEST).read_text().strip() == "step_00000003"
    assert (ckpt_dir / "step_00000003" / MANIFEST).is_file()
    assert verify(str(ckpt_dir / "step_00000003")).step == 3


@pytest.mark.timeout(2400)  # two trainer start-ups (vLLM engines included) on a 2-core machine
def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    total = 30  # ~1 s per step here: the signal lands long before the end
    job, log = submit_70b(slurm_cluster, str(tmp_path),
                          _env(tmp_path, f"--set trainer.steps={total} --set checkpoint.save_every=0"))
    # Signal once RL is under way: what `#SBATCH --signal=USR1@300` does before the time limit; --full sends it
    # to the batch shell and to every process of every step (trainer ranks and their vLLM/reward helpers).
    wait_for(lambda: len(_steps(run_dir)) >= 1, 900, "the first RL step", log, poll=0.25,
             cluster=slurm_cluster, job=job)
    slurm_cluster.run(["scancel", "--signal=USR1", "--full", str(job)])
    release_requeued(slurm_cluster, job, 1, log, timeout=600)

    # The stopped run saved exactly one checkpoint (save_every=0: only on the signal and at the end).
    saved = _checkpoints(ckpt_dir)
    assert len(saved) == 1, (saved, read_text(log)[-4000:])
    saved_step = verify(str(ckpt_dir / saved[0])).step
    assert 1 <= saved_step < total, saved_step
    first_run_metrics = read_text(run_dir / "metrics.jsonl")
    assert _steps(run_dir) == list(range(1, saved_step + 1))

    info = slurm_cluster.wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=900, poll=2.0)
    text = read_text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-6000:]
    assert info["Restarts"] == "1"
    assert "trainer stopped on a signal after saving a checkpoint (exit 3)" in text
    assert f"requeueing job {job} (restart 1)" in text
    assert f"resuming from {ckpt_dir / saved[0]}" in text
    assert [r["JobState"] for r in slurm_cluster.completions(job)] == ["PENDING", "COMPLETED"]
    # The requeued run continued after the saved step: steps 1..saved_step are the first run's records,
    # untouched, and the resumed run appended saved_step+1..total.
    assert _steps(run_dir) == list(range(1, total + 1))
    assert read_text(run_dir / "metrics.jsonl").startswith(first_run_metrics)
    assert (ckpt_dir / LATEST).read_text().strip() == f"step_{total:08d}"
