#!/bin/bash
# Convert a Hugging Face checkpoint to a Megatron (dist_checkpointing) one for training:
#   sbatch slurm/convert_hf.sh /ckpt/hf/Llama-3.1-70B-Instruct /ckpt/llama-3.1-70b-instruct-mcore [--dtype bfloat16]
# (or AAPO_HF_DIR=... AAPO_OUT=... sbatch slurm/convert_hf.sh). Runs `aapo-convert hf-to-mcore` on one CPU node:
# weights are streamed shard by shard, the output directory appears only when complete. AAPO_CONVERT_WORKERS sets
# the worker processes (pipeline stages; default: the converter's choice), AAPO_CONVERT_DTYPE the output dtype.
# AAPO_VENV / AAPO_CONTAINER work as for the training scripts (see slurm/common.sh).
#SBATCH --job-name=aapo-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

# Locate the repository. Under sbatch this file runs from a copy in Slurm's spool directory, so also ask
# Slurm for the submitted path, then fall back to the submit directory.
if [ -z "${AAPO_HOME:-}" ]; then
    for _cand in "$(dirname "${BASH_SOURCE[0]}")/.." \
        "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2> /dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' || true)")/.." \
        "${SLURM_SUBMIT_DIR:-.}"; do
        if [ -f "$_cand/slurm/common.sh" ]; then
            AAPO_HOME=$(cd "$_cand" && pwd)
            break
        fi
    done
fi
[ -n "${AAPO_HOME:-}" ] || { echo "cannot find the repository (slurm/common.sh); set AAPO_HOME" >&2; exit 2; }
export AAPO_HOME
# shellcheck source=slurm/common.sh
source "$AAPO_HOME/slurm/common.sh"

aapo_convert_main "$@"
