#!/usr/bin/env bash
# `make gpu-check`: the GPU acceptance script. On one GPU machine with only torch (CUDA build), nvcc and pybind11:
#   1. builds the CUDA variant of aapo_megatron._C in place,
#   2. runs tests/gpu (CUDA kernels against the CPU ops and pure-torch references; Megatron's
#      vocab_parallel_cross_entropy too when megatron-core is importable),
#   3. times the log-prob kernels against a device-to-device copy (benchmarks/bench_logprob_gpu.py),
#   4. checks CUDA IPC between two processes (benchmarks/gpu_ipc_check.py),
# and prints one table. Target: at most 8 minutes on one H100. Logs go to runs/gpu-check/.
#
# No network is needed. pytest (and optionally megatron-core) come from the machine or from a wheel folder
# (AAPO_GPU_WHEELS, default wheels/gpu-check); fill it on any machine with network access with
#   pip download -d wheels/gpu-check pytest pytest-timeout
#   pip download -d wheels/gpu-check --no-deps megatron-core==0.16.1      # optional: the Megatron parity rows
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
WHEELS="${AAPO_GPU_WHEELS:-wheels/gpu-check}"
LOGS=runs/gpu-check
mkdir -p "$LOGS"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)}"
rows=()
failed=0

step() {  # step NAME LOGFILE CMD...: runs CMD, records status and seconds
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "gpu-check: $name ..."
  "$@" >"$LOGS/$log" 2>&1
  local rc=$?
  local status=ok; [ $rc -eq 0 ] || { status="FAILED (rc $rc, $LOGS/$log)"; failed=1; }
  rows+=("$(printf '%-34s %-44s %6ss' "$name" "$status" $((SECONDS - t0)))")
  tail -n 40 "$LOGS/$log"
  return $rc
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: needs a CUDA device and a CUDA build of torch ($PY: $("$PY" -c 'import torch; print(torch.__version__)' 2>&1))" >&2
  exit 2
fi
"$PY" -c 'import torch; print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, arch list {__import__("os").environ["TORCH_CUDA_ARCH_LIST"]}")'

if ! "$PY" -c 'import pytest' 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" pytest pytest-timeout || exit 2
  else
    echo "gpu-check: pytest is not installed and $WHEELS has no wheels. On a machine with network access run" >&2
    echo "  pip download -d $WHEELS pytest pytest-timeout" >&2
    echo "and bring that folder here (or set AAPO_GPU_WHEELS)." >&2
    exit 2
  fi
fi
if ! "$PY" -c 'import megatron.core' 2>/dev/null && compgen -G "$WHEELS/megatron_core-*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" megatron-core || true
fi
megatron_note="megatron-core importable"
"$PY" -c 'import megatron.core' 2>/dev/null || megatron_note="no megatron-core: its parity rows fail; pip download --no-deps megatron-core==0.16.1"

step "build CUDA extension" build.log "$PY" setup.py --quiet build_ext --inplace
built=$?
if [ $built -eq 0 ]; then
  step "import + build_info" build_info.log "$PY" -c 'import aapo_megatron._C as c; i = c.build_info(); print(i); assert i["cuda"], "built without CUDA"'
  timeout_arg=(); "$PY" -c 'import pytest_timeout' 2>/dev/null && timeout_arg=(--timeout=600)
  step "tests/gpu" tests_gpu.log "$PY" -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" "${timeout_arg[@]}"
  step "log-prob kernels vs copy" bench_logprob.log "$PY" benchmarks/bench_logprob_gpu.py --iters 10
  step "CUDA IPC between processes" ipc.log "$PY" benchmarks/gpu_ipc_check.py
fi

echo
echo "gpu-check summary ($(date -u +%Y-%m-%dT%H:%MZ), $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'); $megatron_note)"
printf '%-34s %-44s %7s\n' step status time
for r in "${rows[@]}"; do echo "$r"; done
grep -E "passed|failed|error" "$LOGS/tests_gpu.log" 2>/dev/null | tail -n 1
exit $failed
