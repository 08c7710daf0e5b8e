# shellcheck shell=bash
# ci/lib.sh - shell functions shared by the ci/*-up.sh and ci/*-down.sh scripts.
# Source it; it defines functions only (no variables, no commands run).
#
# Globals the functions read (set by the calling script):
#   ME        script name for messages and the log file (slurm-up, sge-down, ...)
#   TUNABLES  names of the environment variables kept across the sudo re-exec
#   STATE     directory of our pid records and of the up/down lock
#   PKGS      packages install_pkgs makes sure of
#   T_START   start time of an up script (date +%s.%N), for finish_up
# An up script defines smoke [USER] (submit a job, set SMOKE) for finish_up.
# Globals they set: CI_LOGDIR LOG APTLOG (open_log), TMP_POLICY, INSTALL_NOTE
# (install_pkgs), STARTED (record), stopped failed (stop_group), ME TUNABLES
# STATE (down_main).

# --------------------------------------------------------------------------
# root, lock, logging, failure reporting
# --------------------------------------------------------------------------
# need_root "$@": as non-root with passwordless sudo, re-exec the script
# through sudo with the TUNABLES that are set; without sudo, fail.
# (down_main passes none: the down scripts read no arguments)
# shellcheck disable=SC2120
need_root() {
  [[ $(id -u) -ne 0 ]] || return 0
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    local v envs=()
    for v in "${TUNABLES[@]}"; do [[ -n ${!v+x} ]] && envs+=("$v=${!v}"); done
    exec sudo -n env "${envs[@]}" "$(readlink -f "$0")" "$@"
  fi
  echo "$ME: must run as root (or with passwordless sudo)" >&2; exit 1
}

# open_log: take $STATE/lock (one up/down at a time: several developers may
# call them at once), then send stdout/stderr to $LOG; fd 3/4 = the caller's
# stdout/stderr.  fd 8 must not leak into the daemons, or they would hold the
# lock forever (see spawn)
open_log() {
  CI_LOGDIR=${HPC_CI_LOGDIR:-/var/log/hpc-ci}
  LOG=$CI_LOGDIR/$ME.log
  APTLOG=$CI_LOGDIR/apt.log
  mkdir -p "$CI_LOGDIR" "$STATE"
  exec 8>"$STATE/lock"
  flock -w 900 8 || { echo "$ME: timed out waiting for $STATE/lock" >&2; exit 1; }
  exec 3>&1 4>&2 >"$LOG" 2>&1
}

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$ME" -1 "$*"; }
# TMP_POLICY is 1 while our temporary /usr/sbin/policy-rc.d exists
cleanup_policy() { [[ ${TMP_POLICY:-0} == 1 ]] && rm -f /usr/sbin/policy-rc.d; TMP_POLICY=0; }
# die MSG [LOGFILE...]: print our log tail + the named logs' tails, exit 1
die() {
  trap - ERR
  log "ERROR: $1"
  cleanup_policy
  {
    echo "$ME: FAILED: $1"
    local f
    for f in "$LOG" "${@:2}"; do
      [[ -s $f ]] || continue
      echo "----- last lines of $f"
      tail -n 25 "$f"
    done
  } >&4
  exit 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
# has GREP-ARGS: like `grep -q` but reads all input: under pipefail, `cmd | grep -q`
# fails with 141 whenever cmd is still writing when grep exits (apt-cache does)
has() { grep "$@" >/dev/null; }

# --------------------------------------------------------------------------
# packages.  The apt lock lets slurm-up.sh and sge-up.sh run in parallel; a
# temporary policy-rc.d keeps package scripts from starting daemons.
# --------------------------------------------------------------------------
pkg_ok() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | has 'install ok installed'; }
missing_pkgs() { local p; for p in "${PKGS[@]}"; do pkg_ok "$p" || echo "$p"; done; }
# lists are missing/stale if a package has no candidate or the newest list is old
apt_lists_stale() {
  local p newest
  for p in "$@"; do
    apt-cache policy "$p" 2>/dev/null | has 'Candidate: [0-9]' || return 0
  done
  newest=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -printf '%T@\n' 2>/dev/null | sort -n | tail -1)
  [[ -z $newest ]] && return 0
  (( $(date +%s) - ${newest%.*} > ${HPC_CI_APT_MAX_AGE:-604800} ))
}
apt_q() { DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 "$@" >>"$APTLOG" 2>&1; }
# install_pkgs [PREPARE...]: install the missing PKGS; PREPARE (e.g. debconf
# preseeding) runs under the apt lock just before apt-get
install_pkgs() {
  local missing updated=0 t0
  INSTALL_NOTE=""
  mapfile -t missing < <(missing_pkgs)
  ((${#missing[@]})) || return 0
  [[ ${SKIP_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]} (SKIP_INSTALL=1)"
  exec 9>/run/hpc-ci/apt.lock
  flock 9
  mapfile -t missing < <(missing_pkgs)       # the other script may have installed some
  if ((${#missing[@]})); then
    t0=$(date +%s.%N)
    log "installing: ${missing[*]} (apt output: $APTLOG)"
    if (($#)); then "$@"; fi
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; TMP_POLICY=1
    fi
    if apt_lists_stale "${missing[@]}"; then
      log "apt-get update"; apt_q update || die "apt-get update failed" "$APTLOG"; updated=1
    fi
    if ! apt_q install -y --no-install-recommends "${missing[@]}"; then
      # an old list may name .debs the mirror no longer has: refresh once, retry
      [[ $updated == 1 ]] && die "apt-get install failed" "$APTLOG"
      log "install failed, apt-get update and retry"
      apt_q update || die "apt-get update failed" "$APTLOG"
      apt_q install -y --no-install-recommends "${missing[@]}" || die "apt-get install failed" "$APTLOG"
    fi
    cleanup_policy
    INSTALL_NOTE=", installed ${#missing[@]} packages in $(elapsed "$t0")s"
    log "installed in $(elapsed "$t0")s"
  fi
  flock -u 9; exec 9>&-
}

# --------------------------------------------------------------------------
# pid bookkeeping (never match processes by name)
# --------------------------------------------------------------------------
# alive_from_pidfile COMM PIDFILE -> prints pid if PIDFILE names a live COMM
alive_from_pidfile() {
  local pid
  [[ -s $2 ]] || return 1
  pid=$(tr -dc '0-9' < "$2")
  [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
  echo "$pid"
}
# wait_pidfile COMM PIDFILE SECS -> pid once the daemon wrote its pid file
wait_pidfile() {
  local i pid
  for ((i = 0; i < $3 * 10; i++)); do
    pid=$(alive_from_pidfile "$1" "$2") && { echo "$pid"; return 0; }
    sleep 0.1
  done
  return 1
}
# record NAME PID: remember in $STATE that we started NAME
record() { echo "$2" > "$STATE/$1.pid"; STARTED+=("$1"); log "started $1 (pid $2)"; }
# spawn CMD...: start a daemon without our fds 3/4 (the caller's stdout/stderr)
# and 8/9 (locks): a daemon holding them would make `out=$(slurm-up.sh)` hang forever
spawn() { "$@" </dev/null >>"$LOG" 2>&1 3>&- 4>&- 8>&- 9>&-; }

# finish_up SCHED DETAILS: run the up script's smoke function (as root, then as
# $HPC_CI_USER if set), print the one success line and exit 0
finish_up() {
  local started summary
  smoke
  [[ -z ${HPC_CI_USER:-} ]] || smoke "$HPC_CI_USER"
  started=${STARTED[*]:-none}
  summary="$1: up in $(elapsed "$T_START")s ($2; started: ${started// /,}; $SMOKE$INSTALL_NOTE)"
  log "$summary"
  echo "$summary" >&3
  exit 0
}

# --------------------------------------------------------------------------
# down scripts
# --------------------------------------------------------------------------
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

# stop_group NAME...: SIGTERM all of them at once, wait, SIGKILL leftovers;
# adds to the arrays stopped and failed
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

# down_main SCHED GROUP...: the whole of SCHED-down.sh.  Stops the daemons of
# each GROUP (names separated by spaces, stopped together), one GROUP after
# the other; then prints "SCHED: stopped ..." and exits 0, or exits 1 with our
# log tail on stderr if a daemon would not stop
down_main() {
  local t0 group names s msg
  ME=$1-down
  TUNABLES=(HPC_CI_LOGDIR)
  need_root
  STATE=/run/hpc-ci/$1
  open_log                        # never while an up script is starting daemons
  t0=$SECONDS
  stopped=() failed=()
  for group in "${@:2}"; do
    read -ra names <<<"$group"
    stop_group "${names[@]}"
  done
  if ((${#failed[@]})); then
    { echo "$ME: FAILED to stop: ${failed[*]}"; tail -n 25 "$LOG"; } >&4
    exit 1
  fi
  s=${stopped[*]:-}
  s=${s// /,}
  msg="$1: stopped ${s:-nothing (none of ours running)}${s:+ in $((SECONDS - t0))s}"
  log "$msg"
  echo "$msg" >&3
  exit 0
}

# --------------------------------------------------------------------------
# schedulers-up.sh / schedulers-down.sh
# --------------------------------------------------------------------------
# run_both DIR up|down: run DIR/slurm-ACTION.sh and DIR/sge-ACTION.sh in
# parallel, then print their stdout and stderr in that order; returns 1 if
# either failed
run_both() {
  local tmp n i names=(slurm sge) pids=() rc=0
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: tmp is local, the trap runs at exit
  trap "rm -rf '$tmp'" EXIT
  for n in "${names[@]}"; do
    "$1/$n-$2.sh" >"$tmp/$n.out" 2>"$tmp/$n.err" </dev/null &
    pids+=($!)
  done
  for i in "${!names[@]}"; do
    n=${names[i]}
    wait "${pids[i]}" || rc=1
    cat "$tmp/$n.out"
    cat "$tmp/$n.err" >&2
  done
  return $rc
}
