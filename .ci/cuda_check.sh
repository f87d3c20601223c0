#!/usr/bin/env bash
# Compile-check every CUDA source for sm_80 and sm_90 with warnings as errors.
# Nothing can run them here; this catches syntax, type and template errors.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-/usr/local/cuda/bin/nvcc}"
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "cuda-check: no .cu files"; exit 0; fi
if [ ! -x "$NVCC" ]; then echo "cuda-check: nvcc not found at $NVCC" >&2; exit 1; fi
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  for arch in sm_80 sm_90; do
    echo "cuda-check: $f ($arch)"
    "$NVCC" -c -std=c++17 -O3 -arch="$arch" -Icsrc -Werror all-warnings -Xcompiler -Wall,-Werror \
      "$f" -o "$out/$(basename "$f").$arch.o"
  done
done
echo "cuda-check: ok (${#files[@]} files)"
