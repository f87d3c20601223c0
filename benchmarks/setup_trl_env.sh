#!/usr/bin/env bash
# Create (or refresh) the optional TRL benchmark environment used by benchmarks/bench_vs_trl.py.
#
#   bash benchmarks/setup_trl_env.sh            # -> .venv-trl at the repository root
#   TRL_VENV=/path/to/venv bash benchmarks/setup_trl_env.sh
#
# Idempotent: does nothing when .venv-trl already holds the pinned set (a stamp records the hash of
# benchmarks/requirements-trl.txt). torch goes in first and alone as torch==2.13.0 so pip takes the CPU
# wheel, as the Makefile does for .venv; set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu)
# on a machine without that wheel at hand. TRL is never installed into the product's .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRL_VENV:-$ROOT/.venv-trl}"
REQ="$ROOT/benchmarks/requirements-trl.txt"
PYTHON_BOOT="${PYTHON_BOOT:-python3}"
STAMP="$VENV/.stamp-trl"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "TRL environment up to date: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON_BOOT" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${PIP[@]}" --index-url "$TORCH_INDEX_URL" torch==2.13.0
else
    "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" -r "$REQ"
# Anything that pulled a torchvision/torchaudio build not matching the CPU torch breaks `import transformers`.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "TRL environment ready: $VENV"
