#!/usr/bin/env bash
# ci/schedulers-down.sh - stop the daemons ci/slurm-up.sh and ci/sge-up.sh
# started (ci/slurm-down.sh and ci/sge-down.sh in parallel).  One line each;
# exits non-zero if either failed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
names=(slurm sge) pids=() rc=0
for n in "${names[@]}"; do
  "$HERE/$n-down.sh" >"$T/$n.out" 2>"$T/$n.err" </dev/null &
  pids+=($!)
done
for i in "${!names[@]}"; do
  n=${names[i]}
  wait "${pids[i]}" || rc=1
  cat "$T/$n.out"
  cat "$T/$n.err" >&2
done
exit $rc
