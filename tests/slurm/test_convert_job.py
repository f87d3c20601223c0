"""slurm/convert_hf.sh as a real Slurm job: a tiny HF checkpoint -> Megatron checkpoint.

(Bitwise round trips of the conversion itself are tests/convert's; here the job script must run it.)"""

from __future__ import annotations

import json
import os

import pytest

from tests.convert.conftest import save_tiny_hf
from tests.slurm.helpers import REPO, read_text

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_convert_job_writes_a_megatron_checkpoint(slurm_cluster, tmp_path):
    from aapo_megatron.checkpoint.mcore import METADATA_NAME, read_arch

    hf, mcore = tmp_path / "hf", tmp_path / "mcore"
    save_tiny_hf("qwen2_tied", str(hf))
    log = tmp_path / "convert.out"
    job = slurm_cluster.sbatch(os.path.join(REPO, "slurm", "convert_hf.sh"),
                               ["--cpus-per-task=2", f"--output={log}"],
                               env={"OMP_NUM_THREADS": "1", "AAPO_CONVERT_WORKERS": "2"},
                               script_args=[str(hf), str(mcore)], cwd=REPO)
    info = slurm_cluster.wait_job(job, timeout=600, poll=2.0)
    text = read_text(str(log))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert f"wrote Megatron checkpoint to {mcore}" in text
    assert f"conversion finished: set model.path: {mcore} in your config" in text

    # A complete Megatron checkpoint of the source model: metadata written last, architecture read back.
    meta = json.loads((mcore / METADATA_NAME).read_text())
    assert meta["architecture"] == "Qwen2ForCausalLM" and meta["dtype"] == "float32"
    arch = read_arch(str(mcore))
    assert arch.tie_word_embeddings and arch.num_layers == 2
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no partial output left behind


def test_convert_job_reports_a_missing_input(slurm_cluster, tmp_path):
    log = tmp_path / "convert.out"
    job = slurm_cluster.sbatch(os.path.join(REPO, "slurm", "convert_hf.sh"), ["--cpus-per-task=1", f"--output={log}"],
                               script_args=[str(tmp_path / "no_such_hf"), str(tmp_path / "out")], cwd=REPO)
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert f"HF checkpoint directory not found: {tmp_path / 'no_such_hf'}" in read_text(str(log))
    assert not (tmp_path / "out").exists()
