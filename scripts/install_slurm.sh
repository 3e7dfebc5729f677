#!/usr/bin/env bash
# Install what the tests' local Slurm cluster needs (tests/slurm_cluster.py): Debian's
# slurmctld, slurmd, slurm-client and munge.  Idempotent: does nothing when they are there.
# Runs `apt-get update` only when the package lists do not know them (or an install from
# the current lists fails).  Needs root, or sudo.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd sbatch munged)
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for cmd in "${COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_slurm: Slurm and MUNGE already installed ($(command -v slurmctld))"
    exit 0
fi
echo "install_slurm: missing ${missing[*]}; installing ${PACKAGES[*]}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_slurm: need root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "$@"; }

known=1
for pkg in "${PACKAGES[@]}"; do
    apt-cache show "$pkg" >/dev/null 2>&1 || known=0
done
if [ "$known" -eq 0 ]; then
    apt_get update
    apt_get install -y "${PACKAGES[@]}"
elif ! apt_get install -y "${PACKAGES[@]}"; then
    apt_get update   # stale package lists: refresh once and retry
    apt_get install -y "${PACKAGES[@]}"
fi
command -v slurmctld >/dev/null && command -v munged >/dev/null
echo "install_slurm: installed $(slurmctld -V)"
