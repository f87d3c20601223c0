"""Builds the compiled extension `aapo_megatron._C`.

The one place that decides CPU vs CUDA at build time:
- torch built with CUDA and nvcc found  -> CUDAExtension (csrc/*.cpp + csrc/cuda/*.cu), AAPO_WITH_CUDA defined;
- otherwise                              -> CppExtension (csrc/*.cpp) with OpenMP.
Set AAPO_FORCE_CPU=1 to build the CPU variant on a CUDA machine, AAPO_SKIP_EXT=1 to install without the extension.
torch with CUDA but no nvcc builds the CPU variant with a loud warning (its ops then refuse CUDA tensors).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_build_choice(torch_cuda: str | None, cuda_home: str | None, force_cpu: bool) -> tuple[bool, str | None]:
    """(build the CUDA variant?, warning to print or None) from torch's CUDA version, CUDA_HOME and AAPO_FORCE_CPU."""
    if force_cpu or torch_cuda is None:
        return False, None
    if cuda_home is not None and shutil.which(os.path.join(cuda_home, "bin", "nvcc")) is not None:
        return True, None
    where = f"{cuda_home}/bin/nvcc does not exist" if cuda_home else "CUDA_HOME is not set and nvcc is not on PATH"
    return False, (f"WARNING: torch {torch.__version__} has CUDA {torch_cuda}, but {where}: building the CPU-ONLY "
                   "aapo_megatron._C. Its ops will refuse CUDA tensors. Install the CUDA toolkit (nvcc) and set "
                   "CUDA_HOME to build the CUDA kernels, or set AAPO_FORCE_CPU=1 to build the CPU variant on purpose.")


def _want_cuda() -> bool:
    use_cuda, warning = cuda_build_choice(torch.version.cuda, CUDA_HOME, os.environ.get("AAPO_FORCE_CPU") == "1")
    if warning:
        print("\n" + "*" * 100 + "\n" + warning + "\n" + "*" * 100 + "\n", file=sys.stderr, flush=True)
        warnings.warn(warning, stacklevel=2)
    return use_cuda


def _link_args() -> list[str]:
    """OpenMP, and an rpath to torch's libraries (libc10, libtorch...), so `import aapo_megatron._C` works without
    importing torch first: the build's torch (in-place / editable builds) and ../torch/lib (an installed wheel)."""
    torch_lib = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
    return ["-fopenmp", f"-Wl,-rpath,{torch_lib}", "-Wl,-rpath,$ORIGIN/../torch/lib"]


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if os.environ.get("AAPO_NATIVE", "1") == "1":  # AAPO_NATIVE=0 for portable wheels
        cxx_flags.append("-march=native")
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cuda_cpp = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return CUDAExtension(
            "aapo_megatron._C",
            cpp_sources + cuda_cpp + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("AAPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=_link_args(),
        )
    return CppExtension(
        "aapo_megatron._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=_link_args(),
    )


# `make` installs the package metadata with AAPO_SKIP_EXT=1 and then builds the extension once,
# in place, with `setup.py build_ext --inplace` (ninja keeps that incremental).
if __name__ == "__main__":  # setuptools runs this file as __main__ (tests import it for cuda_build_choice)
    setup(
        ext_modules=[] if os.environ.get("AAPO_SKIP_EXT") == "1" else [_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
