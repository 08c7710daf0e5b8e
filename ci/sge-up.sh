#!/usr/bin/env bash
# ci/sge-up.sh - bring up a real single-host Son of Grid Engine 8.1.9 (Debian 12
# packages) WITHOUT systemd.  Adapted from shared/infra/sge-up.sh (see
# shared/infra/README.md for the quirks this works around).
#
# One host = master + exec + submit + admin host.  Queue all.q, host group
# @allhosts, parallel environment smp ($pe_slots).
# Idempotent: installs missing packages, starts only daemons that are not
# running, re-applies the configuration every run.
# Quiet: everything goes to $HPC_CI_LOGDIR/sge-up.log; on success ONE line is
# printed on stdout, on failure the relevant log tails go to stderr (exit 1).
# Exit 0 only when the queue instance is usable AND a smoke job finished with
# exit_status 0 in qacct.
#
# Runs as root; a non-root caller with passwordless sudo is re-executed via sudo.
# Clients need SGE_ROOT/SGE_CELL: `. ci/sge-env.sh`.  Any local user whose home
# directory exists can submit (qsub reads ~/.sge_aliases; `nobody` cannot).
#
# Tunables (environment):
#   SGE_SLOTS           slots of all.q (default 16; more than the real cores on
#                       purpose: arrays of tiny jobs run faster)
#   SGE_MAX_AJ_TASKS    max tasks of one array job (default 100001)
#   HPC_CI_USER         if set, the smoke job is also submitted as this user
#   HPC_CI_LOGDIR       our logs (default /var/log/hpc-ci)
#   HPC_CI_APT_MAX_AGE  apt lists older than this many seconds are refreshed
#                       before installing (default 604800 = 7 days)
#   SKIP_INSTALL=1      never call apt-get
set -Eeuo pipefail

ME=sge-up
TUNABLES=(SGE_SLOTS SGE_MAX_AJ_TASKS HPC_CI_USER HPC_CI_LOGDIR HPC_CI_APT_MAX_AGE SKIP_INSTALL)

# --------------------------------------------------------------------------
# 0. root (or sudo), logging, failure reporting (functions: ci/lib.sh)
# --------------------------------------------------------------------------
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
need_root "$@"

export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
COMMON=$SGE_ROOT/$SGE_CELL/common
QSPOOL=/var/spool/gridengine/qmaster
ESPOOL=/var/spool/gridengine/execd
STATE=/run/hpc-ci/sge            # pid records of daemons WE started
open_log
T_START=$(date +%s.%N)
trap 'die "command failed (line $LINENO): $BASH_COMMAND" "$QSPOOL/messages"' ERR

HOST=$(hostname)
SLOTS=${SGE_SLOTS:-16}
MAX_AJ=${SGE_MAX_AJ_TASKS:-100001}
is_uint "$SLOTS" && ((SLOTS > 0)) || die "SGE_SLOTS must be a positive integer, got '$SLOTS'"
is_uint "$MAX_AJ" && ((MAX_AJ > 0)) || die "SGE_MAX_AJ_TASKS must be a positive integer, got '$MAX_AJ'"
[[ -z ${HPC_CI_USER:-} ]] || id -u "$HPC_CI_USER" >/dev/null 2>&1 || die "HPC_CI_USER: no such user '$HPC_CI_USER'"

# --------------------------------------------------------------------------
# 1. packages, preseeded so the postinst creates the cell non-interactively.
#    The lock lets slurm-up.sh and sge-up.sh run in parallel; a temporary
#    policy-rc.d keeps package scripts from starting daemons.
# --------------------------------------------------------------------------
PKGS=(gridengine-common gridengine-master gridengine-exec gridengine-client)
# preseed_cell: let the postinst create the cell non-interactively
# shellcheck disable=SC2317  # called through install_pkgs
preseed_cell() {
  printf '%s\n' \
    "gridengine-common shared/gridengineconfig boolean true" \
    "gridengine-common shared/gridenginecell string $SGE_CELL" \
    "gridengine-common shared/gridenginemaster string $HOST" | debconf-set-selections
}
install_pkgs preseed_cell

# cell not initialised (e.g. packages were installed with gridengineconfig=false)
if [[ ! -f $COMMON/bootstrap ]]; then
  log "initialising cell $SGE_CELL"
  for d in $QSPOOL $QSPOOL/job_scripts /var/spool/gridengine/spooldb $ESPOOL; do
    mkdir -p "$d"; chown sgeadmin:sgeadmin "$d"
  done
  su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL /var/spool/gridengine/spooldb sgeadmin" sgeadmin \
    || die "init_cluster failed"
fi

# --------------------------------------------------------------------------
# 2. host naming.  The hostname resolves to 127.0.0.1, whose reverse name is
#    "localhost"; qmaster would reject every client ("client IP resolved to
#    host name localhost ...").  host_aliases maps localhost onto the hostname.
# --------------------------------------------------------------------------
mkdir -p "$COMMON"
echo "$HOST" > "$COMMON/act_qmaster"
echo "$HOST localhost" > "$COMMON/host_aliases"
chown sgeadmin:sgeadmin "$COMMON/act_qmaster" "$COMMON/host_aliases"
mkdir -p /run/gridengine; chown sgeadmin:sgeadmin /run/gridengine

STARTED=()                       # daemons this run started (see record)

# port_busy PORT: something listens on TCP PORT (from /proc: ss may be absent)
port_busy() {
  awk -v p="$(printf ':%04X' "$1")" '$4 == "0A" && substr($2, length($2) - 4) == p {f = 1} END {exit !f}' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# --------------------------------------------------------------------------
# 3. qmaster (pid file: $QSPOOL/qmaster.pid, written by the daemon itself)
# --------------------------------------------------------------------------
if pid=$(alive_from_pidfile sge_qmaster $QSPOOL/qmaster.pid); then
  log "sge_qmaster already running (pid $pid)"
else
  # never start a second qmaster while an old one is still shutting down
  for ((i = 0; i < 300; i++)); do port_busy 6444 || break; sleep 0.1; done
  port_busy 6444 && die "port 6444 still busy, not starting sge_qmaster" "$QSPOOL/messages"
  rm -f $QSPOOL/qmaster.pid
  spawn /usr/sbin/sge_qmaster
  pid=$(wait_pidfile sge_qmaster $QSPOOL/qmaster.pid 30) || die "sge_qmaster did not start" "$QSPOOL/messages"
  record sge_qmaster "$pid"
fi
for ((i = 0; i < 120; i++)); do qconf -sh >/dev/null 2>&1 && break; sleep 0.25; done
qconf -sh >/dev/null 2>&1 || die "qmaster does not answer" "$QSPOOL/messages"

# --------------------------------------------------------------------------
# 4. cluster configuration (re-applied every run; all commands idempotent)
# --------------------------------------------------------------------------
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
qc() { # run a qconf command quietly; fail with its output
  local out
  out=$("$@" 2>&1) || die "$* : $out" "$QSPOOL/messages"
}

qconf -sh 2>/dev/null | has -x "$HOST" || qc qconf -ah "$HOST"
qconf -ss 2>/dev/null | has -x "$HOST" || qc qconf -as "$HOST"

# global configuration: root may run jobs (min_uid 0), accounting written
# immediately (accounting_flush_time=0) so qacct sees a job as soon as it ends
cat > "$T/global" <<EOF
execd_spool_dir              $ESPOOL
mailer                       /usr/bin/mail
xterm                        /usr/bin/xterm
load_sensor                  none
prolog                       none
epilog                       none
shell_start_mode             posix_compliant
login_shells                 bash,sh,ksh,csh,tcsh
min_uid                      0
min_gid                      0
user_lists                   none
xuser_lists                  none
projects                     none
xprojects                    none
enforce_project              false
enforce_user                 auto
load_report_time             00:00:10
max_unheard                  00:05:00
reschedule_unknown           00:00:00
loglevel                     log_warning
administrator_mail           none
set_token_cmd                none
pag_cmd                      none
token_extend_time            none
shepherd_cmd                 none
qmaster_params               none
execd_params                 none
reporting_params             accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00
finished_jobs                100
gid_range                    65400-65500
qlogin_command               builtin
qlogin_daemon                builtin
rlogin_command               builtin
rlogin_daemon                builtin
rsh_command                  builtin
rsh_daemon                   builtin
max_aj_instances             2000
max_aj_tasks                 $MAX_AJ
max_u_jobs                   0
max_jobs                     0
auto_user_oticket            0
auto_user_fshare             0
auto_user_default_project    none
auto_user_delete_time        86400
delegated_file_staging       false
reprioritize                 0
jsv_url                      none
jsv_allowed_mod              ac,h,i,e,o,j,M,N,p,w
EOF
qc qconf -Mconf "$T/global"

# scheduler: run every second and right after every submit / job end
qconf -ssconf > "$T/sconf"
sed -i -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
       -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
       -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' \
       -e 's/^job_load_adjustments .*/job_load_adjustments              NONE/' \
       -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time        0:0:0/' \
       -e 's/^max_pending_tasks_per_job .*/max_pending_tasks_per_job         1000/' \
       "$T/sconf"
qc qconf -Msconf "$T/sconf"

# exec host
if ! qconf -sel 2>/dev/null | has -x "$HOST"; then
  printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$HOST" > "$T/exechost"
  qc qconf -Ae "$T/exechost"
fi

# host group @allhosts
printf 'group_name @allhosts\nhostlist %s\n' "$HOST" > "$T/allhosts"
if qconf -shgrpl 2>/dev/null | has -x '@allhosts'; then
  qc qconf -Mhgrp "$T/allhosts"
else
  qc qconf -Ahgrp "$T/allhosts"
fi

# parallel environment smp: all slots on one host
cat > "$T/smp" <<'EOF'
pe_name            smp
slots              9999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
if qconf -spl 2>/dev/null | has -x smp; then qc qconf -Mp "$T/smp"; else qc qconf -Ap "$T/smp"; fi

# queue all.q: qconf -aq / -sq give the full template; a sed "editor" sets our
# attributes (the Debian template's pe_list names PEs make/mpi that do not exist)
printf '#!/bin/sh\nsed -i -e "s/^hostlist .*/hostlist @allhosts/" -e "s/^slots .*/slots %s/" -e "s/^pe_list .*/pe_list smp/" -e "s|^shell .*|shell /bin/sh|" -e "s/^load_thresholds .*/load_thresholds NONE/" "$1"\n' "$SLOTS" > "$T/edq"
chmod 755 "$T/edq"
if qconf -sql 2>/dev/null | has -x all.q; then
  qconf -sq all.q > "$T/allq"; "$T/edq" "$T/allq"; qc qconf -Mq "$T/allq"
else
  EDITOR="$T/edq" qc qconf -aq all.q
fi

# --------------------------------------------------------------------------
# 5. execd.  Its spool dir (and pid file) is named after the name the host
#    resolves to WITHOUT host_aliases - "localhost" on 127.0.0.1 machines -
#    so look for $ESPOOL/*/execd.pid
# --------------------------------------------------------------------------
find_execd() {
  local f pid
  for f in "$ESPOOL"/*/execd.pid; do
    pid=$(alive_from_pidfile sge_execd "$f") && { echo "$pid"; return 0; }
  done
  return 1
}
mkdir -p "$ESPOOL"; chown sgeadmin:sgeadmin "$ESPOOL"
if pid=$(find_execd); then
  log "sge_execd already running (pid $pid)"
else
  for ((i = 0; i < 300; i++)); do port_busy 6445 || break; sleep 0.1; done
  port_busy 6445 && die "port 6445 still busy, not starting sge_execd" "$QSPOOL/messages"
  rm -f "$ESPOOL"/*/execd.pid
  spawn /usr/sbin/sge_execd
  pid=""
  for ((i = 0; i < 300; i++)); do pid=$(find_execd) && break; sleep 0.1; done
  [[ -n $pid ]] || die "sge_execd did not start" "$QSPOOL/messages" "$ESPOOL"/*/messages
  record sge_execd "$pid"
fi

# wait until the queue instance has a load report and no alarm/unknown state
qi="" st=""
for ((i = 0; i < 240; i++)); do
  qi=$(qstat -f -q "all.q@$HOST" 2>/dev/null | awk -v h="all.q@$HOST" '$1==h') || qi=""
  if [[ -n $qi ]]; then
    st=$(awk '{print $6}' <<<"$qi")
    [[ -z $st ]] && break
    if [[ $st == *E* ]]; then qmod -cq "all.q@$HOST" >/dev/null 2>&1 || true; fi
    if [[ $st == *d* ]]; then qmod -e "all.q@$HOST" >/dev/null 2>&1 || true; fi
  fi
  sleep 0.25
done
[[ -n $qi && -z $st ]] || die "queue instance not usable: '$qi'" "$QSPOOL/messages" "$ESPOOL"/*/messages
log "qstat -f: $qi"

# --------------------------------------------------------------------------
# 6. smoke test: a job must finish with exit_status 0 in qacct
# --------------------------------------------------------------------------
# smoke [USER]: submit `true` (as USER if given), wait for exit_status 0 in qacct
smoke() {
  local as=() jid i t0 ok=0
  [[ -n ${1:-} ]] && as=(runuser -u "$1" --)
  t0=$(date +%s.%N)
  jid=$(cd /tmp && "${as[@]}" env SGE_ROOT="$SGE_ROOT" SGE_CELL="$SGE_CELL" \
        qsub -terse -b y -N ci-smoke -o /dev/null -e /dev/null true) \
    || die "qsub failed${1:+ (as $1)}: $jid" "$QSPOOL/messages"
  for ((i = 0; i < 600; i++)); do
    if qacct -j "$jid" 2>/dev/null | has -E '^exit_status +0'; then ok=1; break; fi
    sleep 0.1
  done
  [[ $ok == 1 ]] || die "smoke job $jid${1:+ (as $1)} not in qacct with exit_status 0" "$QSPOOL/messages" "$ESPOOL"/*/messages
  SMOKE="smoke job $jid${1:+ (as $1)} exit_status 0 in qacct after $(elapsed "$t0")s"
  log "$SMOKE"
}
finish_up sge "host $HOST, all.q $SLOTS slots, max_aj_tasks $MAX_AJ"
