"""A stop signal during the SFT warm start: a real `aapo-train` process saves an SFT checkpoint and exits 3 (so
Slurm requeues), and `--resume auto` continues the SFT exactly: step, sampler, optimizer and RNG carry over. And the
guard against non-finite gradients (trainer.max_bad_steps), on the same cheap SFT-only runs."""

import math
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from aapo_megatron.checkpoint.manager import CheckpointManager
from aapo_megatron.trainer.metrics import read_metrics
from tests.trainer.test_e2e import _cmd, _env, _wait_for

SFT = ["trainer.mode=sft", "trainer.sft_steps=30", "checkpoint.save_every=0"]


def _sft_losses(run_dir):
    return [(r["step"], r["sft/loss"]) for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("phase") == "sft"]


@pytest.mark.slow
def test_signal_during_sft_saves_exits_3_and_resumes_exactly(tmp_path):
    straight = str(tmp_path / "straight")
    proc = subprocess.run(_cmd(straight, 1, SFT), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    run_dir = str(tmp_path / "stopped")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    proc = subprocess.Popen(_cmd(run_dir, 1, SFT), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        # Freeze the process at its first SFT step, queue the signal, let it go on: it stops long before step 30.
        seen = _wait_for(lambda: bool(_sft_losses(run_dir)), proc, 600, poll=0.02)
        if seen:
            os.killpg(proc.pid, signal.SIGSTOP)
            os.kill(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
        assert seen, "no SFT step was logged"
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, out[-4000:]
    assert "stop signal received during the SFT warm start" in out
    info = CheckpointManager(os.path.join(run_dir, "checkpoints")).latest()
    assert info is not None and info.step == 0  # RL step 0: an SFT checkpoint
    loop = torch.load(os.path.join(info.path, "trainer.pt"), weights_only=False)["loop"]
    done = loop["sft_step"]
    assert 1 <= done < 30 and loop["sft_sampler"], loop
    assert len(_sft_losses(run_dir)) == done
    assert not os.path.exists(os.path.join(run_dir, "hf_final"))

    proc = subprocess.run(_cmd(run_dir, 1, SFT) + ["--resume", "auto"], env=_env(), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from" in out and f"resumed after step {done}" in out
    assert _sft_losses(run_dir) == _sft_losses(straight)  # bitwise: same batches, weights and Adam state
    wa, wb = (load_file(os.path.join(d, "hf_final", "model.safetensors")) for d in (straight, run_dir))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert read_metrics(metrics)[0]["step"] == -29  # one history: the stopped run's records, then the resumed run's


@pytest.mark.slow
def test_non_finite_gradients_stop_the_run_after_max_bad_steps(tmp_path):
    """A real fault, no mock: sft_lr=1e30 makes the first update blow the weights up; every later gradient is NaN.
    Those updates are skipped and counted, and the third in a row (trainer.max_bad_steps=3) stops the run, exit 1."""
    run_dir = str(tmp_path / "bad")
    proc = subprocess.run(_cmd(run_dir, 1, SFT + ["trainer.sft_lr=1e30", "trainer.max_bad_steps=3"]), env=_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert ("aapo-train: 3 consecutive steps had a non-finite loss or gradient (trainer.max_bad_steps=3); stopping. "
            "Lower optim.lr or check the data.") in out
    assert out.count("non-finite loss or gradient: update skipped") == 3
    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r.get("phase") == "sft"]
    assert [r["bad_steps"] for r in records] == [0, 1, 2]  # step 4 raised before it was logged
    assert records[0]["grad_norm"] > 0 and all(r["grad_norm"] in (None, "nan") or math.isnan(r["grad_norm"])
                                          for r in records[1:])  # non-finite: logged as NaN
    assert not os.path.exists(os.path.join(run_dir, "hf_final"))
