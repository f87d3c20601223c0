"""Builds the compiled extension `aapo_megatron._C`.

The one place that decides CPU vs CUDA at build time:
- torch built with CUDA and nvcc found  -> CUDAExtension (csrc/*.cpp + csrc/cuda/*.cu), AAPO_WITH_CUDA defined;
- otherwise                              -> CppExtension (csrc/*.cpp) with OpenMP.
Set AAPO_FORCE_CPU=1 to build the CPU variant on a CUDA machine, AAPO_SKIP_EXT=1 to install without the extension.
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("AAPO_FORCE_CPU") == "1":
        return False
    has_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    return torch.version.cuda is not None and has_nvcc


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
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "aapo_megatron._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


# `make` installs the package metadata with AAPO_SKIP_EXT=1 and then builds the extension once,
# in place, with `setup.py build_ext --inplace` (ninja keeps that incremental).
setup(
    ext_modules=[] if os.environ.get("AAPO_SKIP_EXT") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
