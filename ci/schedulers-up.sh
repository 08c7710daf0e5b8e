#!/usr/bin/env bash
# ci/schedulers-up.sh - bring up real Slurm (ci/slurm-up.sh) and Grid Engine
# (ci/sge-up.sh) side by side.  Both run in parallel: they share no ports or
# files, and their apt-get steps serialise on /run/hpc-ci/apt.lock.
# Prints one line per scheduler (the failing one's log tails go to stderr);
# exits non-zero if either failed.  Environment tunables pass through (see the
# two scripts).  Clients of SGE then need: . ci/sge-env.sh
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
names=(slurm sge) pids=() rc=0
for n in "${names[@]}"; do
  "$HERE/$n-up.sh" >"$T/$n.out" 2>"$T/$n.err" </dev/null &
  pids+=($!)
done
for i in "${!names[@]}"; do
  n=${names[i]}
  wait "${pids[i]}" || rc=1
  cat "$T/$n.out"
  cat "$T/$n.err" >&2
done
exit $rc
