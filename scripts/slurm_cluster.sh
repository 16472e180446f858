#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and CI.
#
#   scripts/slurm_cluster.sh start  STATE_DIR   # install if missing, configure, start, wait for idle nodes
#   scripts/slurm_cluster.sh status STATE_DIR   # exit 0 when every daemon is up
#   scripts/slurm_cluster.sh stop   STATE_DIR   # cancel jobs, shut the daemons down, wait for them to go
#
# Runs as root (it installs Debian packages and starts daemons). The emulated nodes node1 and
# node2 are two slurmd processes on 127.0.0.1 with one port each. Everything the daemons write
# (state, spool, logs, pid files, the job completion log) and the cluster's own configuration,
# STATE_DIR/slurm.conf, live in STATE_DIR. /etc/slurm/slurm.conf is never read nor written: the
# daemons and every client command get SLURM_CONF=STATE_DIR/slurm.conf, and so must the commands
# you run against this cluster:
#
#   export SLURM_CONF=STATE_DIR/slurm.conf; sbatch ...; squeue
#
# Ports (to run a second cluster beside one that is up): SLURM_CLUSTER_PORT (slurmctld; slurmd's
# default port is the next one, default 6817) and SLURM_CLUSTER_NODE_PORT (node1's port, node2's is
# the next one; default 17001), and SLURM_CLUSTER_FIRST_JOB_ID (default 1: job ids, and so the
# jobs' default rendezvous ports, 20000 + id % 10000, differ from the other cluster's).
set -euo pipefail

MARKER="# written by encdec scripts/slurm_cluster.sh (local test cluster)"
NODES=(node1 node2)
PKGS=(slurmctld slurmd slurm-client munge)
START_TIMEOUT=${SLURM_CLUSTER_START_TIMEOUT:-60}   # seconds until both nodes must be idle
STOP_TIMEOUT=${SLURM_CLUSTER_STOP_TIMEOUT:-30}

die() { echo "slurm_cluster: error: $*" >&2; exit 1; }
log() { echo "slurm_cluster: $*"; }

usage() { echo "usage: $0 {start|stop|status} STATE_DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
CMD=$1
STATE=$(realpath -m -- "$2")
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF          # the daemons and sinfo/squeue/scancel/scontrol below read this config
CTLD_PORT=${SLURM_CLUSTER_PORT:-6817}
NODE_PORT=${SLURM_CLUSTER_NODE_PORT:-17001}
FIRST_JOB_ID=${SLURM_CLUSTER_FIRST_JOB_ID:-1}
[[ $CTLD_PORT =~ ^[0-9]+$ && $NODE_PORT =~ ^[0-9]+$ && $FIRST_JOB_ID =~ ^[0-9]+$ ]] \
  || die "SLURM_CLUSTER_PORT / SLURM_CLUSTER_NODE_PORT / SLURM_CLUSTER_FIRST_JOB_ID: not numbers"

alive() {   # alive PIDFILE [COMM] -> 0 when the pid in the file runs (and is named COMM)
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ -z ${2:-} ]] || [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

now() { date +%s.%N; }

tail_logs() {
  local f
  for f in "$STATE"/log/*.log /var/log/munge/munged.log; do
    [[ -f $f ]] || continue
    echo "---- last lines of $f" >&2
    tail -n 15 "$f" >&2
  done
}

# ----------------------------------------------------------------------------- start

install_packages() {
  local missing=0 b
  for b in slurmctld slurmd sbatch squeue sinfo scontrol munged; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing=1
  done
  [[ $missing -eq 1 ]] || return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is missing: install ${PKGS[*]} by hand"
  log "installing ${PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >"$STATE/log/apt.log" 2>&1; then
    log "install failed; running apt-get update and trying again"
    apt-get update -q >>"$STATE/log/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"$STATE/log/apt.log" 2>&1 \
      || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get install ${PKGS[*]} failed (log: $STATE/log/apt.log)"; }
  fi
}

write_conf() {
  if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace it"
  fi
  local tmp="$CONF.tmp$$"
  cat >"$tmp" <<EOF
$MARKER
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
FirstJobId=$FIRST_JOB_ID
MailProg=/bin/true
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$NODE_PORT-$((NODE_PORT + 1)) CPUs=2 RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv -f "$tmp" "$CONF"
}

add_hosts() {   # MASTER_ADDR=node1 must resolve
  local n missing=0
  for n in "${NODES[@]}"; do
    grep -Eq "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts || missing=1
  done
  [[ $missing -eq 0 ]] || echo "127.0.0.1 ${NODES[*]}  # encdec local Slurm cluster" >>/etc/hosts
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  alive "$STATE/munged.pid" munged && return 0
  if munge_works; then   # a munged we did not start (the system's): use it, never stop it
    log "using the munged already running"
    return 0
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force 9>&- \
    || { tail_logs; die "munged did not start"; }
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s /run/munge/munged.pid ]] && munge_works && break
    sleep 0.1
  done
  munge_works || { tail_logs; die "munged started but munge/unmunge fails"; }
  cp /run/munge/munged.pid "$STATE/munged.pid"
}

nodes_idle() {
  local out
  out=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
  [[ $out == "$(printf 'node1 idle\nnode2 idle')" ]]
}

start() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
  local t0 n
  t0=$(now)
  mkdir -p "$STATE"/{ctld,log,spool/node1,spool/node2}
  install_packages
  write_conf
  add_hosts
  start_munged
  if ! alive "$STATE/slurmctld.pid" slurmctld; then
    slurmctld -f "$CONF" 9>&- || { tail_logs; die "slurmctld did not start"; }
  fi
  for n in "${NODES[@]}"; do
    alive "$STATE/slurmd-$n.pid" slurmd || slurmd -f "$CONF" -N "$n" 9>&- \
      || { tail_logs; die "slurmd -N $n did not start"; }
  done
  local deadline=$(($(date +%s) + START_TIMEOUT))
  until nodes_idle; do
    if (($(date +%s) >= deadline)); then
      sinfo -N >&2 || true
      tail_logs
      die "nodes not idle after ${START_TIMEOUT}s (logs in $STATE/log)"
    fi
    sleep 0.2
  done
  log "up: ${NODES[*]} idle, SLURM_CONF=$CONF ($(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s)"
}

# ----------------------------------------------------------------------------- stop

wait_gone() {   # wait_gone SECONDS PID... -> 0 when none is left
  local deadline=$(($(date +%s) + $1)) p left
  shift
  while :; do
    left=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left=1; done
    [[ $left -eq 0 ]] && return 0
    (($(date +%s) < deadline)) || return 1
    sleep 0.2
  done
}

stop() {
  [[ $(id -u) -eq 0 ]] || die "must run as root"
  local pids=() f n jobs
  if alive "$STATE/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local deadline=$(($(date +%s) + STOP_TIMEOUT))
      while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && (($(date +%s) < deadline)); do sleep 0.5; done
    fi
  fi
  alive "$STATE/slurmctld.pid" slurmctld && pids+=("$(<"$STATE/slurmctld.pid")")
  for n in "${NODES[@]}"; do
    alive "$STATE/slurmd-$n.pid" slurmd && pids+=("$(<"$STATE/slurmd-$n.pid")")
  done
  if [[ ${#pids[@]} -gt 0 ]]; then
    if alive "$STATE/slurmctld.pid" slurmctld; then
      scontrol shutdown >/dev/null 2>&1 || true   # stops slurmctld and every slurmd
    fi
    if ! wait_gone "$STOP_TIMEOUT" "${pids[@]}"; then   # shutdown did not reach them: end them by pid
      kill -TERM "${pids[@]}" 2>/dev/null || true
      wait_gone 10 "${pids[@]}" || { kill -KILL "${pids[@]}" 2>/dev/null || true; }
    fi
  fi
  if alive "$STATE/munged.pid" munged && pgrep -x slurmctld >/dev/null; then
    # another local cluster (another state folder) still runs and uses this munged: leave it
    log "munged (pid $(<"$STATE/munged.pid")) left running: another slurmctld uses it"
  elif alive "$STATE/munged.pid" munged; then
    f=$(<"$STATE/munged.pid")
    kill -TERM "$f"
    wait_gone 10 "$f" || die "munged (pid $f) did not stop"
  fi
  rm -f "$STATE/munged.pid"
  log "stopped (state in $STATE)"
}

# ----------------------------------------------------------------------------- status

status() {
  local ok=0 n
  report() { if alive "$1" "$2"; then echo "$3: running (pid $(<"$1"))"; else echo "$3: not running"; ok=1; fi; }
  if alive "$STATE/munged.pid" munged; then echo "munged: running (pid $(<"$STATE/munged.pid"))"
  elif munge_works; then echo "munged: running (not started by this script)"
  else echo "munged: not running"; ok=1; fi
  report "$STATE/slurmctld.pid" slurmctld slurmctld
  for n in "${NODES[@]}"; do report "$STATE/slurmd-$n.pid" slurmd "slurmd $n"; done
  [[ $ok -eq 0 ]] && sinfo -N 2>/dev/null
  return $ok
}

# One invocation at a time on this machine (two test sessions may start or stop together).
# The daemons are started with fd 9 closed, or they would hold this lock forever.
exec 9>/tmp/encdec-slurm-cluster.lock
flock -w 180 9 || die "another slurm_cluster.sh holds /tmp/encdec-slurm-cluster.lock"

case $CMD in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
