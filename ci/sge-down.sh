#!/usr/bin/env bash
# ci/sge-down.sh - stop exactly the daemons ci/sge-up.sh started.
# Adapted from shared/infra/sge-down.sh.  Reads the pid records in
# /run/hpc-ci/sge/<name>.pid, checks that each pid still belongs to a process
# named <name> (never matches by name alone), sends SIGTERM, SIGKILL after 30 s.
# Safe to run when nothing is running.  Cell configuration and spool (job ids,
# accounting file) stay, so sge-up.sh brings the same cluster back.
# sge_qmaster needs ~10 s to exit after SIGTERM.
# Quiet: one line on success; log tail on failure (exit 1).
set -uo pipefail

ME=sge-down
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n env ${HPC_CI_LOGDIR:+HPC_CI_LOGDIR="$HPC_CI_LOGDIR"} "$(readlink -f "$0")" "$@"
  fi
  echo "$ME: must run as root (or with passwordless sudo)" >&2; exit 1
fi
STATE=/run/hpc-ci/sge
CI_LOGDIR=${HPC_CI_LOGDIR:-/var/log/hpc-ci}
LOG=$CI_LOGDIR/$ME.log
mkdir -p "$CI_LOGDIR" "$STATE"
exec 8>"$STATE/lock"            # never while an up script is starting daemons
flock -w 900 8 || { echo "$ME: timed out waiting for $STATE/lock" >&2; exit 1; }
exec 3>&1 4>&2 >"$LOG" 2>&1
T0=$SECONDS
log() { printf '[%s %(%H:%M:%S)T] %s\n' "$ME" -1 "$*"; }

# ours NAME -> pid if the record names a live process called NAME
ours() {
  local pf=$STATE/$1.pid pid
  [[ -s $pf ]] || return 1
  pid=$(tr -dc '0-9' < "$pf")
  if [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; then
    echo "$pid"; return 0
  fi
  log "$1: recorded pid $pid is not running (stale record)"
  rm -f "$pf"
  return 1
}

# stop_group NAME...: SIGTERM all of them at once, wait, SIGKILL leftovers
stopped=() failed=()
stop_group() {
  local name pid i alive names=() pids=()
  for name in "$@"; do
    pid=$(ours "$name") || continue
    log "stopping $name (pid $pid)"; kill -TERM "$pid" 2>/dev/null
    names+=("$name"); pids+=("$pid")
  done
  for ((i = 0; i < 300; i++)); do
    alive=0
    for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    name=${names[i]} pid=${pids[i]}
    if [[ -d /proc/$pid ]]; then
      log "$name (pid $pid) ignored SIGTERM for 30 s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null; sleep 0.5
      [[ -d /proc/$pid ]] && { log "could not stop $name (pid $pid)"; failed+=("$name"); continue; }
    fi
    rm -f "$STATE/$name.pid"; stopped+=("$name")
  done
}
# both at once: execd does not need the master to shut down
stop_group sge_execd sge_qmaster

if ((${#failed[@]})); then
  { echo "$ME: FAILED to stop: ${failed[*]}"; tail -n 25 "$LOG"; } >&4
  exit 1
fi
s=${stopped[*]:-}
s=${s// /,}
msg="sge: stopped ${s:-nothing (none of ours running)}${s:+ in $((SECONDS - T0))s}"
log "$msg"
echo "$msg" >&3
exit 0
