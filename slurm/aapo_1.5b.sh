#!/bin/bash
# AAPO on DeepSeek-R1-Distill-Qwen-1.5B (the paper's 1.5B setting): `sbatch slurm/aapo_1.5b.sh`.
#
# One 8-GPU node, TP=1/PP=1 (configs/deepseek_r1_distill_qwen_1.5b.yaml) -> 8 data-parallel ranks, one per
# GPU; the policy and reference vLLM engines are colocated with the trainer. Signal, checkpoint, requeue and
# the environment overrides work as in slurm/aapo_70b.sh (listed at the top of slurm/common.sh).
#SBATCH --job-name=aapo-1.5b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
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

AAPO_CONFIG=${AAPO_CONFIG:-configs/deepseek_r1_distill_qwen_1.5b.yaml}
aapo_train_main "$@"
