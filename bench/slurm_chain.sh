#!/usr/bin/env bash
# bench/slurm_chain.sh - hand-written Slurm baseline for the benchmarks: the
# 3-stage pipeline a user would write without a workflow manager.
#
#   stage 1  one job:   python3 writes a JSON list of N ints to input.json
#   stage 2  N-element array (--array=0-(N-1)), afterok:1: task i reads element
#            i and writes its square to sq_<i>.txt
#   stage 3  one job, afterok:2: sums the squares into result.txt
#
# Prints the wall time from the first sbatch until the last job is COMPLETED in
# sacct, the number of sbatch calls, and whether the result is right.
# Needs a running Slurm with accounting (ci/slurm-up.sh).
#
# Usage: bench/slurm_chain.sh [N]       (default N=200, or $N)
# Environment: N, CHAIN_POLL (sacct poll interval, s, default 0.1),
#   CHAIN_TIMEOUT (s, default 600), CHAIN_KEEP=1 (keep the work dir),
#   CHAIN_PARTITION (default: the cluster's default partition)
set -euo pipefail

N=${1:-${N:-200}}
POLL=${CHAIN_POLL:-0.1}
TIMEOUT=${CHAIN_TIMEOUT:-600}
[[ $N =~ ^[0-9]+$ ]] && ((N >= 1)) || { echo "slurm_chain: N must be a positive integer, got '$N'" >&2; exit 2; }

W=$(mktemp -d "${TMPDIR:-/tmp}/slurm_chain.XXXXXX")
chmod 755 "$W"
[[ ${CHAIN_KEEP:-0} == 1 ]] || trap 'rm -rf "$W"' EXIT
mkdir "$W/logs"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
SB=(sbatch --parsable -D "$W" ${CHAIN_PARTITION:+-p "$CHAIN_PARTITION"})
# submit ARGS...: sbatch with the common options; prints the job id
submit() {
  local out
  out=$("${SB[@]}" "$@") || { echo "slurm_chain: sbatch failed: $*" >&2; exit 1; }
  echo "${out%%;*}"       # --parsable prints "id" or "id;cluster"
}

# python snippets use only double quotes: they are single-quoted for /bin/sh
PY1="import json; json.dump(list(range($N)), open(\"input.json\", \"w\"))"
PY2="import json, os; i = int(os.environ[\"SLURM_ARRAY_TASK_ID\"]); x = json.load(open(\"input.json\"))[i]; open(\"sq_%d.txt\" % i, \"w\").write(str(x * x))"
PY3="print(sum(int(open(\"sq_%d.txt\" % i).read()) for i in range($N)))"

t0=$(now)
calls=0
j1=$(submit -J chain1 -o logs/chain1_%j.out --wrap "python3 -c '$PY1'"); calls=$((calls + 1))
j2=$(submit -J chain2 -o logs/chain2_%A_%a.out --array=0-$((N - 1)) \
       --dependency=afterok:"$j1" --wrap "python3 -c '$PY2'"); calls=$((calls + 1))
j3=$(submit -J chain3 -o result.txt --dependency=afterok:"$j2" --wrap "python3 -c '$PY3'"); calls=$((calls + 1))
t_sub=$(since "$t0")

# poll sacct for the last job; every ~2 s also look for a failed stage
fail_states='^(FAILED|CANCELLED.*|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL|BOOT_FAIL|DEADLINE)$'
i=0
while :; do
  st=$(sacct -X -P -n -j "$j3" -o State 2>/dev/null | head -1) || st=""
  [[ $st == COMPLETED ]] && break
  if [[ $st =~ $fail_states ]] || { ((i % 20 == 0)) &&
      sacct -X -P -n -j "$j1,$j2" -o State 2>/dev/null | grep -E "$fail_states" >/dev/null; }; then
    echo "slurm_chain: a stage failed:" >&2
    sacct -X -P -n -j "$j1,$j2,$j3" -o JobID,JobName,State,ExitCode | grep -v '|COMPLETED|' | head >&2
    scancel "$j1" "$j2" "$j3" 2>/dev/null || true   # stage 3 would wait forever
    echo "work dir kept: $W" >&2; trap - EXIT; exit 1
  fi
  if awk -v a="$t0" -v b="$(now)" -v t="$TIMEOUT" 'BEGIN{exit !(b-a > t)}'; then
    echo "slurm_chain: timeout after ${TIMEOUT}s (job $j3: '$st'); work dir kept: $W" >&2
    scancel "$j1" "$j2" "$j3" 2>/dev/null || true
    trap - EXIT; exit 1
  fi
  i=$((i + 1))
  sleep "$POLL"
done
wall=$(since "$t0")

want=$(( (N - 1) * N * (2 * N - 1) / 6 ))
got=$(tr -dc '0-9' < "$W/result.txt")
ok=ok; [[ $got == "$want" ]] || ok="WRONG (want $want)"
echo "slurm_chain: N=$N wall=${wall}s sbatch_calls=$calls (submitted in ${t_sub}s) jobs=$j1,$j2,$j3 result=$got $ok"
[[ $ok == ok ]]
