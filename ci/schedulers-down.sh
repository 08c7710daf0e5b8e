#!/usr/bin/env bash
# ci/schedulers-down.sh - stop the daemons ci/slurm-up.sh and ci/sge-up.sh
# started (ci/slurm-down.sh and ci/sge-down.sh in parallel).  One line each;
# exits non-zero if either failed.
set -uo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
run_both "$HERE" down
