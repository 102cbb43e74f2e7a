#!/usr/bin/env bash
# A private, single-node SLURM cluster on this machine, for tests and CI.
#
#   scripts/ci/slurm-single-node.sh install        # apt-get install slurm-wlm + munge if missing
#   scripts/ci/slurm-single-node.sh start DIR      # write DIR/slurm.conf, start munged, slurmctld,
#                                                  # slurmd; wait until the node is idle
#   export SLURM_CONF=DIR/slurm.conf               # then sbatch / squeue / sinfo talk to it
#   scripts/ci/slurm-single-node.sh stop DIR       # cancel its jobs, stop the three daemons
#
# Everything lives in DIR: the config, a fresh munge key and socket, the state and spool
# folders, the logs and the PID files; the daemons listen on free loopback ports. Nothing
# under /etc is used or changed, so it runs beside a system SLURM or another instance of
# itself. Debian/Ubuntu (apt) and root only: slurmd starts jobs as their submitting user,
# and `install` needs apt-get. One node, "localhost", 2 CPUs (SLURM_TEST_CPUS), no cgroups
# (proctrack/linuxproc, task/none), no accounting.
#
# Exit codes: 0 ok; 1 a daemon failed to start or the node did not become idle (the tail
# of every log is printed); 2 usage; 3 not root, or no apt-get and SLURM missing (callers
# skip on 3).
set -euo pipefail

PACKAGES=(slurm-wlm munge)
WAIT_S="${SLURM_TEST_WAIT_S:-60}"
CPUS="${SLURM_TEST_CPUS:-2}"

die() {
  echo "slurm-single-node: $*" >&2
  exit "${2:-1}"
}

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd launches jobs as their user)" 3
}

have_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null
}

install() {
  need_root
  if have_slurm; then
    echo "slurm-single-node: $(slurmctld -V) and munge already installed"
    return 0
  fi
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get" 3
  echo "slurm-single-node: apt-get install ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d (containers) or a missing systemd keep the packaged services from starting;
  # we start our own instances anyway. --no-install-recommends: not the 40 optional plugins.
  apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null
  apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}" \
    >/dev/null
  have_slurm || die "apt-get installed ${PACKAGES[*]} but slurmctld/slurmd/sbatch/munged are missing"
  echo "slurm-single-node: installed $(slurmctld -V)"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

show_logs() {
  local dir=$1 f
  for f in "$dir"/log/*.log; do
    [ -e "$f" ] || continue
    echo "----- $f (last 30 lines)" >&2
    tail -n 30 "$f" >&2 || true
  done
}

pid_alive() {
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # wait_for SECONDS COMMAND...: poll every 0.2 s until COMMAND succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

node_idle() {
  [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]
}

start() {
  need_root
  have_slurm || die "slurmctld/slurmd/sbatch/munged not found; run '$0 install' first" 3
  local dir
  dir=$(mkdir -p "$1" && cd "$1" && pwd)
  [ ! -e "$dir/slurm.conf" ] || die "$dir/slurm.conf exists: one cluster per folder (stop it first)" 2
  mkdir -p "$dir"/{munge,state,spool,log,run}
  chmod 700 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$dir/munge/munge.key"
  local ctld_port slurmd_port
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
  cat >"$dir/slurm.conf" <<EOF
# written by scripts/ci/slurm-single-node.sh: one node, no accounting, no cgroups
ClusterName=flowmodel-test
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  # munged refuses to run as root unless forced; the socket and key are private to $dir
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munge.seed" \
    || { show_logs "$dir"; die "munged did not start"; }
  wait_for 10 test -S "$dir/munge/munge.socket" || { show_logs "$dir"; die "no munge socket"; }
  slurmctld -f "$SLURM_CONF" || { show_logs "$dir"; die "slurmctld did not start"; }
  slurmd -f "$SLURM_CONF" -N localhost || { show_logs "$dir"; die "slurmd did not start"; }
  if ! wait_for "$WAIT_S" node_idle; then
    sinfo -N -l >&2 || true
    show_logs "$dir"
    die "node 'localhost' not idle after ${WAIT_S}s"
  fi
  echo "slurm-single-node: cluster flowmodel-test up in $dir (slurmctld :$ctld_port, slurmd :$slurmd_port)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid() { # stop_pid PIDFILE NAME: SIGTERM, then SIGKILL after 10 s
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for 10 eval "! kill -0 $pid 2>/dev/null"; then
      echo "slurm-single-node: $name ($pid) ignored SIGTERM; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

stepd_pids() { # slurmstepd processes of this cluster (they inherit SLURM_CONF from slurmd)
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" \
      && echo "${p#/proc/}"
  done
  return 0
}

no_jobs() {
  [ -z "$(squeue -h -o %i 2>/dev/null)" ]
}

stop() {
  local dir
  dir=$(cd "$1" && pwd) || die "no folder $1" 2
  [ -e "$dir/slurm.conf" ] || die "$dir/slurm.conf not found: nothing to stop" 2
  export SLURM_CONF="$dir/slurm.conf"
  if pid_alive "$dir/run/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    # shellcheck disable=SC2086  # one job id per word
    [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
    wait_for 30 no_jobs || echo "slurm-single-node: jobs still listed after scancel" >&2
  fi
  stop_pid "$dir/run/slurmd.pid" slurmd
  stop_pid "$dir/run/slurmctld.pid" slurmctld
  local pid
  for pid in $(stepd_pids); do
    echo "slurm-single-node: killing leftover slurmstepd $pid" >&2
    kill -KILL "$pid" 2>/dev/null || true
  done
  stop_pid "$dir/run/munged.pid" munged
  mv "$dir/slurm.conf" "$dir/slurm.conf.stopped"
  echo "slurm-single-node: stopped the cluster in $dir"
}

case "${1:-}" in
  install) install ;;
  start) [ $# -eq 2 ] || die "usage: $0 start DIR" 2; start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR" 2; stop "$2" ;;
  *) die "usage: $0 install | start DIR | stop DIR" 2 ;;
esac
