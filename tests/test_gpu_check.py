"""`make gpu-check` on a machine without a GPU: it refuses with exit 2 before building anything, and so does its
CUDA IPC check. (What it does on a GPU is recorded in benchmarks/README.md whenever one is at hand.)"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_refuses_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu-check: needs a CUDA device" in proc.stderr
    assert "build CUDA extension" not in proc.stdout


def test_ipc_check_refuses_without_cuda():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_ipc_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
