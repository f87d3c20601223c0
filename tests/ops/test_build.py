"""The compiled extension as built: importable on its own, a CPU-only build refuses CUDA tensors clearly, and
setup.py warns when torch has CUDA but nvcc is missing."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_ARGS = {  # op -> CPU arguments of the right types
    "nan_weighted_reward_sum": (torch.zeros(2, 1), torch.ones(1)),
    "logprob_shard_stats": (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 0, 4),
}


def test_extension_imports_without_importing_torch_first():
    code = ("import sys; import aapo_megatron._C as c; info = c.build_info(); "
            "assert 'cuda' in info, info; import torch; torch.ops.aapo.logprob_shard_stats; print('ok')")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cpu_only_build_refuses_cuda_tensors_with_a_clear_error():
    import aapo_megatron._C as C

    names = ["grouped_advantages", "nan_weighted_reward_sum", "logprob_shard_stats", "logprob_shard_backward",
             "logprob_fused_fwd_bwd"]
    if C.build_info()["cuda"]:  # the CUDA variant: real kernels for every op
        assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"aapo::{n}", "CUDA") for n in names)
        return
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)  # what a CUDA tensor dispatches to
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aapo::{name}", "CUDA"), name
    for name, args in CPU_ARGS.items():
        op = getattr(torch.ops.aapo, name).default
        with pytest.raises(RuntimeError, match=rf"aapo::{name} got CUDA tensors, but aapo_megatron._C was built "
                                               r"without CUDA.*Rebuild it"):
            op.redispatch(cuda, *args)
        op(*args)  # the CPU kernel still runs


def _setup_module():
    spec = importlib.util.spec_from_file_location("aapo_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not run
    return module


def test_setup_warns_when_torch_has_cuda_but_nvcc_is_missing(tmp_path):
    choice = _setup_module().cuda_build_choice
    use, warning = choice("12.8", None, False)
    assert not use and "CPU-ONLY" in warning and "nvcc" in warning and "AAPO_FORCE_CPU=1" in warning
    use, warning = choice("12.8", str(tmp_path), False)
    assert not use and f"{tmp_path}/bin/nvcc does not exist" in warning
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert choice("12.8", str(tmp_path), False) == (True, None)
    assert choice("12.8", None, True) == (False, None)  # AAPO_FORCE_CPU=1: on purpose, no warning
    assert choice(None, None, False) == (False, None)  # CPU torch: nothing to warn about
