#!/bin/bash
# AAPO on a Llama-3-70B-class model, multi-node: `sbatch slurm/aapo_70b.sh` (see docs/cluster.md).
#
# Layout (configs/llama3_70b.yaml): TP=8 inside a node, PP=4 across nodes -> 4 training nodes of 8 GPUs,
# one rank per GPU, launched by srun (distributed init reads Slurm's variables; no torchrun). The config's
# rollout.placement is "server": the last 2 of the 6 nodes run `aapo-rollout-server`, one for the policy
# engine (weight-synced from the trainer) and one for the frozen reference engine. To use standing servers
# instead, `AAPO_ROLLOUT_NODES=0 sbatch --nodes=4 ...` (the config's URLs are used); to run the engines
# colocated with the trainer (rollout TP=8 on rank 0's node, vLLM sleep mode while Megatron trains):
#   AAPO_ROLLOUT_PLACEMENT=colocated AAPO_EXTRA_ARGS="--set rollout.tensor_parallel_size=8 \
#       --set rollout.memory_fraction=0.23" sbatch --nodes=4 slurm/aapo_70b.sh
# (colocated with the config's rollout TP=1 is refused by the memory plan before any rank starts: exit 2).
#
# Five minutes before the time limit Slurm sends SIGUSR1 to the training ranks; the trainer saves a checkpoint
# and exits 3, and this script requeues the job, which resumes from that checkpoint (--resume auto).
#
# The servers bind 0.0.0.0 behind a per-job bearer token; the trainer sends them the weights over the network
# (rollout.weight_transport auto: nccl from GPUs, gloo from CPUs). AAPO_ROLLOUT_NODES=1 puts both servers on the
# last node (half of it each).
#
# Local CPU tests of this very script (what tests/slurm/test_multinode.py runs):
#   AAPO_CONFIG=configs/quickstart_cpu.yaml sbatch --nodes=1 --ntasks=2 --gpus-per-node=0 slurm/aapo_70b.sh
#   AAPO_CONFIG=configs/quickstart_cpu.yaml AAPO_ROLLOUT_PLACEMENT=server AAPO_ROLLOUT_NODES=1 \
#       AAPO_ROLLOUT_MODEL=HF_DIR sbatch --nodes=2 --ntasks=4 --gpus-per-node=0 slurm/aapo_70b.sh \
#       --set trainer.sft_steps=0 --set model.path=HF_DIR --set model.tokenizer=HF_DIR
# Environment overrides (AAPO_CONFIG, AAPO_RUN_DIR, AAPO_CKPT_DIR, AAPO_EXTRA_ARGS, AAPO_VENV, AAPO_CONTAINER,
# ...) are listed at the top of slurm/common.sh; arguments after the script name go to aapo-train.
#
# The ntasks below only reserves CPUs; the launcher starts exactly one rank per GPU on each training node.
#SBATCH --job-name=aapo-70b
#SBATCH --nodes=6
#SBATCH --gpus-per-node=8
#SBATCH --ntasks=48
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
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

AAPO_CONFIG=${AAPO_CONFIG:-configs/llama3_70b.yaml}
AAPO_ROLLOUT_NODES=${AAPO_ROLLOUT_NODES:-2}
aapo_train_main "$@"
