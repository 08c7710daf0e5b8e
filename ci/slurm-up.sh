#!/usr/bin/env bash
# ci/slurm-up.sh - bring up a real single-node Slurm 22.05 (Debian 12 packages)
# with slurmdbd + mariadb (so plain `sacct` works), WITHOUT systemd.
# Adapted from shared/infra/slurm-up.sh (see shared/infra/README.md).
#
# Idempotent: installs missing packages, rewrites the config, starts only the
# daemons that are not running, restarts only those whose config changed.
# Quiet: everything goes to $HPC_CI_LOGDIR/slurm-up.log; on success ONE line is
# printed on stdout, on failure the relevant log tails go to stderr (exit 1).
# Exit 0 only when the node is idle AND a smoke job is COMPLETED in sacct.
#
# Runs as root; a non-root caller with passwordless sudo is re-executed via sudo.
# Any local user with a home directory can then submit jobs and use sacct.
#
# Tunables (environment):
#   SLURM_CPUS            CPUs the node advertises (default 16; more than the
#                         real cores on purpose: arrays of tiny jobs run faster)
#   SLURM_MAX_ARRAY_SIZE  MaxArraySize (default 100001)
#   SLURM_MAX_JOB_COUNT   MaxJobCount (default max(300000, 2*MaxArraySize))
#   SLURM_MIN_JOB_AGE     seconds a finished job stays in squeue (default 10)
#   SLURM_PARTITION       partition name (default debug)
#   SLURM_CLUSTER         cluster name (default ci)
#   SLURM_SCHED_EXTRA     appended to SchedulerParameters, e.g. ",kill_invalid_depend"
#                         (NOT set by default: reflow must not rely on it)
#   SLURM_DB_PASS         mariadb password of user slurm (default slurm)
#   HPC_CI_USER           if set, the smoke job is also submitted as this user
#   HPC_CI_LOGDIR         our logs (default /var/log/hpc-ci)
#   HPC_CI_APT_MAX_AGE    apt lists older than this many seconds are refreshed
#                         before installing (default 604800 = 7 days)
#   SKIP_INSTALL=1        never call apt-get
set -Eeuo pipefail

ME=slurm-up
TUNABLES=(SLURM_CPUS SLURM_MAX_ARRAY_SIZE SLURM_MAX_JOB_COUNT SLURM_MIN_JOB_AGE
  SLURM_PARTITION SLURM_CLUSTER SLURM_SCHED_EXTRA SLURM_DB_PASS HPC_CI_USER
  HPC_CI_LOGDIR HPC_CI_APT_MAX_AGE SKIP_INSTALL)

# --------------------------------------------------------------------------
# 0. root (or sudo), logging, failure reporting (functions: ci/lib.sh)
# --------------------------------------------------------------------------
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
need_root "$@"

STATE=/run/hpc-ci/slurm          # pid records of daemons WE started
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
open_log
T_START=$(date +%s.%N)
trap 'die "command failed (line $LINENO): $BASH_COMMAND" "$LOGDIR/slurmctld.log"' ERR

CLUSTER=${SLURM_CLUSTER:-ci}
PARTITION=${SLURM_PARTITION:-debug}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-10}
DB_PASS=${SLURM_DB_PASS:-slurm}
CPUS=${SLURM_CPUS:-16}
MAX_ARRAY=${SLURM_MAX_ARRAY_SIZE:-100001}
is_uint "$CPUS" && ((CPUS > 0)) || die "SLURM_CPUS must be a positive integer, got '$CPUS'"
is_uint "$MAX_ARRAY" && ((MAX_ARRAY > 0)) || die "SLURM_MAX_ARRAY_SIZE must be a positive integer, got '$MAX_ARRAY'"
is_uint "$MIN_JOB_AGE" || die "SLURM_MIN_JOB_AGE must be an integer, got '$MIN_JOB_AGE'"
MAX_JOBS=${SLURM_MAX_JOB_COUNT:-$(( MAX_ARRAY * 2 > 300000 ? MAX_ARRAY * 2 : 300000 ))}
is_uint "$MAX_JOBS" && ((MAX_JOBS >= MAX_ARRAY)) \
  || die "SLURM_MAX_JOB_COUNT must be an integer >= MaxArraySize ($MAX_ARRAY), got '$MAX_JOBS'"
# a bad name breaks slurm.conf parsing, and every client then dies with a parse error
[[ $PARTITION =~ ^[A-Za-z0-9_.-]+$ ]] || die "SLURM_PARTITION: bad name '$PARTITION'"
[[ $CLUSTER =~ ^[a-z0-9_-]+$ ]] || die "SLURM_CLUSTER: bad name '$CLUSTER' (lower case, digits, - and _)"
[[ -z ${HPC_CI_USER:-} ]] || id -u "$HPC_CI_USER" >/dev/null 2>&1 || die "HPC_CI_USER: no such user '$HPC_CI_USER'"

# --------------------------------------------------------------------------
# 1. packages.  The lock lets slurm-up.sh and sge-up.sh run in parallel; a
#    temporary policy-rc.d keeps package scripts from starting daemons.
# --------------------------------------------------------------------------
PKGS=(munge slurm-wlm slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client)
install_pkgs

STARTED=()                       # daemons this run started (see record)

NODE=$(hostname -s)
# RealMemory: what slurmd detects, minus 5% so the node never goes INVALID
DET_MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1) || DET_MEM=""
[[ -n $DET_MEM ]] || DET_MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
REALMEM=$(( DET_MEM * 95 / 100 ))

mkdir -p "$LOGDIR" "$RUNDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
chown slurm:slurm "$LOGDIR" "$RUNDIR" /var/lib/slurm/slurmctld
chmod 755 "$RUNDIR"

# --------------------------------------------------------------------------
# 2. configuration (rewritten every run; daemons restarted only if it changed)
# --------------------------------------------------------------------------
CONF_CHANGED=0
put_file() { # put_file DEST MODE OWNER  (content on stdin)
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 0; fi
  install -m "$2" -o "${3%:*}" -g "${3#*:}" "$tmp" "$1"; rm -f "$tmp"
  CONF_CHANGED=1; log "wrote $1"
}

put_file /etc/slurm/slurm.conf 644 root:root <<EOF
# generated by reflow ci/slurm-up.sh - single node CI cluster
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=${RUNDIR}/slurmctld.pid
SlurmdPidFile=${RUNDIR}/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MaxArraySize=${MAX_ARRAY}
MaxJobCount=${MAX_JOBS}
MinJobAge=${MIN_JOB_AGE}
KillWait=5
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
MessageTimeout=10
# fast turnaround: schedule on every submit/completion, main loop every 2 s,
# backfill every 1 s, no batching delay
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,sched_min_interval=0,batch_sched_delay=0,bf_interval=1,bf_continue,default_queue_depth=1000,max_rpc_cnt=0${SLURM_SCHED_EXTRA:-}
# trust the NodeName line below even if it claims more CPUs than detected
SlurmdParameters=config_overrides
# accounting: full sacct via slurmdbd/mariadb; jobcomp/filetxt as a cheap extra
# record (readable with 'sacct -c')
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/filetxt
JobCompLoc=${LOGDIR}/jobcomp.log
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REALMEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
SLURM_CONF_CHANGED=$CONF_CHANGED; CONF_CHANGED=0

put_file /etc/slurm/slurmdbd.conf 600 slurm:slurm <<EOF
# generated by reflow ci/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=${LOGDIR}/slurmdbd.log
PidFile=${RUNDIR}/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF
DBD_CONF_CHANGED=$CONF_CHANGED; CONF_CHANGED=0

put_file /etc/mysql/mariadb.conf.d/90-slurm-ci.cnf 644 root:root <<'EOF'
# generated by reflow ci/slurm-up.sh: small footprint, settings slurmdbd recommends
[mysqld]
innodb_buffer_pool_size=256M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
max_connections=64
performance_schema=OFF
EOF
DB_CONF_CHANGED=$CONF_CHANGED; CONF_CHANGED=0

# stop_ours NAME: stop a daemon only if WE started it (for config changes)
stop_ours() {
  local pf=$STATE/$1.pid pid i
  [[ -s $pf ]] || return 0
  pid=$(tr -dc '0-9' < "$pf")
  if [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; then
    log "config changed: restarting $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pf"
}
if [[ $DB_CONF_CHANGED == 1 ]]; then stop_ours mariadbd; fi
if [[ $DBD_CONF_CHANGED == 1 || $DB_CONF_CHANGED == 1 ]]; then stop_ours slurmdbd; fi
if [[ $SLURM_CONF_CHANGED == 1 ]]; then stop_ours slurmd; stop_ours slurmctld; fi

# --------------------------------------------------------------------------
# 3. munged
# --------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating munge key"
  /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
fi
if pid=$(alive_from_pidfile munged /run/munge/munged.pid); then
  log "munged already running (pid $pid)"
else
  rm -f /run/munge/munged.pid
  spawn runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  pid=$(wait_pidfile munged /run/munge/munged.pid 10) || die "munged did not start" /var/log/munge/munged.log
  record munged "$pid"
fi
munge -n | unmunge >/dev/null || die "munge round-trip failed" /var/log/munge/munged.log

# --------------------------------------------------------------------------
# 4. mariadb + database user for slurmdbd
# --------------------------------------------------------------------------
mkdir -p /run/mysqld /var/log/mysql
chown mysql:mysql /run/mysqld /var/log/mysql
if [[ ! -d /var/lib/mysql/mysql ]]; then
  log "initialising mariadb datadir"
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
fi
if pid=$(alive_from_pidfile mariadbd /run/mysqld/mysqld.pid); then
  log "mariadbd already running (pid $pid)"
else
  rm -f /run/mysqld/mysqld.pid
  spawn setsid -f /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
      --log-error=/var/log/mysql/error.log
  pid=$(wait_pidfile mariadbd /run/mysqld/mysqld.pid 60) || die "mariadbd did not start" /var/log/mysql/error.log
  record mariadbd "$pid"
fi
for ((i = 0; i < 120; i++)); do
  mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 && break; sleep 0.5
done
mariadb --socket=/run/mysqld/mysqld.sock <<EOF || die "creating mariadb user failed" /var/log/mysql/error.log
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# --------------------------------------------------------------------------
# 5. slurmdbd (+ register the cluster so slurmctld can send job records)
# --------------------------------------------------------------------------
if pid=$(alive_from_pidfile slurmdbd "$RUNDIR/slurmdbd.pid"); then
  log "slurmdbd already running (pid $pid)"
else
  rm -f "$RUNDIR/slurmdbd.pid"
  spawn /usr/sbin/slurmdbd
  pid=$(wait_pidfile slurmdbd "$RUNDIR/slurmdbd.pid" 30) || die "slurmdbd did not start" "$LOGDIR/slurmdbd.log"
  record slurmdbd "$pid"
fi
for ((i = 0; i < 120; i++)); do
  sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1 && break; sleep 0.5
done
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | has -x "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed" "$LOGDIR/slurmdbd.log"
  log "registered cluster $CLUSTER in slurmdbd"
fi

# --------------------------------------------------------------------------
# 6. slurmctld + slurmd
# --------------------------------------------------------------------------
if pid=$(alive_from_pidfile slurmctld "$RUNDIR/slurmctld.pid"); then
  log "slurmctld already running (pid $pid)"
else
  rm -f "$RUNDIR/slurmctld.pid"
  spawn /usr/sbin/slurmctld
  pid=$(wait_pidfile slurmctld "$RUNDIR/slurmctld.pid" 30) || die "slurmctld did not start" "$LOGDIR/slurmctld.log"
  record slurmctld "$pid"
fi
for ((i = 0; i < 60; i++)); do scontrol ping 2>/dev/null | has 'is UP' && break; sleep 0.5; done
if pid=$(alive_from_pidfile slurmd "$RUNDIR/slurmd.pid"); then
  log "slurmd already running (pid $pid)"
else
  rm -f "$RUNDIR/slurmd.pid"
  spawn /usr/sbin/slurmd
  pid=$(wait_pidfile slurmd "$RUNDIR/slurmd.pid" 30) || die "slurmd did not start" "$LOGDIR/slurmd.log"
  record slurmd "$pid"
fi

# --------------------------------------------------------------------------
# 7. wait for a usable node (resume it if an earlier run left it down/drained)
# --------------------------------------------------------------------------
state=""
for ((i = 0; i < 120; i++)); do
  state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1) || state=""
  case $state in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*|inval*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case $state in
  idle|mixed|allocated|completing) ;;
  *) die "node $NODE not usable (state '$state')" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" ;;
esac
log "sinfo: $(sinfo -h -o '%P %a %D %T %N %c' | head -1)"

# --------------------------------------------------------------------------
# 8. smoke test: a job must run and show up COMPLETED in sacct
# --------------------------------------------------------------------------
# smoke [USER]: submit `true` (as USER if given), wait for COMPLETED in sacct
smoke() {
  local as=() jid st i t0
  [[ -n ${1:-} ]] && as=(runuser -u "$1" --)
  t0=$(date +%s.%N)
  jid=$(cd /tmp && "${as[@]}" sbatch --parsable -o /dev/null -J ci-smoke --wrap true) \
    || die "sbatch failed${1:+ (as $1)}" "$LOGDIR/slurmctld.log"
  for ((i = 0; i < 600; i++)); do
    st=$(sacct -j "$jid" -X -n -P -o State 2>/dev/null | head -1) || st=""
    [[ $st == COMPLETED ]] && break
    case $st in FAILED|CANCELLED*|NODE_FAIL|TIMEOUT|OUT_OF_MEMORY)
      die "smoke job $jid${1:+ (as $1)}: $st" "$LOGDIR/slurmd.log" "$LOGDIR/slurmctld.log" ;;
    esac
    sleep 0.1
  done
  [[ $st == COMPLETED ]] \
    || die "smoke job $jid did not reach COMPLETED in sacct (last: '$st')" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmdbd.log"
  SMOKE="smoke job $jid${1:+ (as $1)} COMPLETED in sacct after $(elapsed "$t0")s"
  log "$SMOKE"
}
finish_up slurm "node $NODE, $CPUS CPUs, partition $PARTITION, MaxArraySize $MAX_ARRAY"
