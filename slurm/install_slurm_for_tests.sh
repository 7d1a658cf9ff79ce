#!/usr/bin/env bash
# Install what tests/slurm/test_slurm.py needs for a single-host SLURM cluster: Debian's slurmctld, slurmd, the client
# commands (sbatch, srun, scontrol, squeue, sacct...) and munge. Run as root on a clean Debian/Ubuntu machine;
# safe to run again (does nothing when everything is installed).
#
# Nothing is configured or started system-wide: the test writes its own slurm.conf, munge key and state directories
# under a temporary directory, starts munged/slurmctld/slurmd itself on free ports and stops them at the end. Any
# daemon that the packages' install scripts start with the (absent) system configuration is stopped again here.
set -euo pipefail

need=()
for cmd in slurmctld slurmd sbatch srun scontrol squeue munged mungekey; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "install_slurm_for_tests: already installed ($(slurmctld -V))"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_slurm_for_tests: missing ${need[*]}; run this script as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# keep package install scripts from starting daemons (no init system in containers; the test starts its own)
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null

for cmd in slurmctld slurmd sbatch srun scontrol squeue munged mungekey; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "install_slurm_for_tests: $cmd still missing after apt-get install" >&2; exit 1; }
done
echo "install_slurm_for_tests: installed $(slurmctld -V), $(munged --version 2>&1 | head -1)"
