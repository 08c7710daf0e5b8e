#!/usr/bin/env bash
# ci/schedulers-up.sh - bring up real Slurm (ci/slurm-up.sh) and Grid Engine
# (ci/sge-up.sh) side by side.  Both run in parallel: they share no ports or
# files, and their apt-get steps serialise on /run/hpc-ci/apt.lock.
# Prints one line per scheduler (the failing one's log tails go to stderr);
# exits non-zero if either failed.  Environment tunables pass through (see the
# two scripts).  Clients of SGE then need: . ci/sge-env.sh
set -uo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
run_both "$HERE" up
