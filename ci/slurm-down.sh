#!/usr/bin/env bash
# ci/slurm-down.sh - stop exactly the daemons ci/slurm-up.sh started.
# Adapted from shared/infra/slurm-down.sh.  Reads the pid records in
# /run/hpc-ci/slurm/<name>.pid, checks that each pid still belongs to a process
# named <name> (never matches by name alone), sends SIGTERM, SIGKILL after 30 s.
# Safe to run when nothing is running.  Config, munge key, mariadb data and
# Slurm state stay, so slurm-up.sh brings the same cluster back.
# Quiet: one line on success; log tail on failure (exit 1).
set -uo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
# reverse start order; slurmctld flushes job records to slurmdbd on shutdown,
# slurmdbd needs mariadb until it has exited
down_main slurm "slurmd slurmctld" slurmdbd "mariadbd munged"
