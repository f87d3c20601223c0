#!/usr/bin/env bash
# Install what tests/slurm needs: Debian's slurm-wlm and munge (the local clusters), shellcheck, and iproute2
# (`ip`: the simulated multi-node cluster's network namespaces).
# Idempotent: does nothing when the binaries are already there. Needs root and apt-get (CI runs as root).
# tests/slurm/cluster.py installs the same packages itself when missing; running this first makes an install
# failure visible as a CI error instead of a skipped test.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
need=()
for bin in slurmctld slurmd sbatch srun scontrol munged shellcheck ip; do
    command -v "$bin" > /dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "slurm_setup: slurm-wlm, munge, shellcheck and iproute2 already installed"
    exit 0
fi
echo "slurm_setup: missing ${need[*]}; installing slurm-wlm munge shellcheck iproute2"
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null 2>&1; then
    echo "slurm_setup: error: need root and apt-get to install slurm-wlm, munge, shellcheck and iproute2" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -q update
apt-get -q install -y --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold slurm-wlm munge shellcheck iproute2
for bin in "${need[@]}"; do
    command -v "$bin" > /dev/null 2>&1 || { echo "slurm_setup: error: $bin still missing after install" >&2; exit 1; }
done
echo "slurm_setup: installed"
