#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on localhost, for tests: munged, slurmctld and slurmd with
# every file (key, sockets, config, state, logs, PID files) under one folder, on free ports, so
# it neither needs nor touches /etc/slurm, /etc/munge or systemd, and several can run at once.
#
#   eval "$(scripts/slurm/local-cluster.sh start DIR)"   # prints: export SLURM_CONF=DIR/slurm.conf
#   sbatch ...; squeue; scontrol ...                    # the usual clients, through SLURM_CONF
#   scripts/slurm/local-cluster.sh status DIR
#   scripts/slurm/local-cluster.sh stop DIR             # safe to call always (from a trap)
#
# Needs: apt-get install -y --no-install-recommends slurm-wlm munge (Debian 12: Slurm 22.05,
# munge 0.5.15), and root (the daemons and jobs run as root; SlurmUser=root).
# DIR: short (<= 70 characters: unix socket paths are limited to 108 bytes), no spaces.
#
# Settings for `start` (environment):
#   LOCAL_SLURM_PORT         first port tried (default 6817); the controller and slurmd take
#                            the first two free ports from there.
#   LOCAL_SLURM_CRED_EXPIRE  credential lifetime in s (default 10, Slurm's 120, minimum 5). A
#                            requeued job may start again only after it, so it sets how long a
#                            requeue takes.
#   LOCAL_SLURM_MIN_JOB_AGE  seconds a finished job stays visible to squeue/scontrol (default
#                            300). `sbatch --wait` polls every 2 s only if this is <= 5 (else
#                            2, 8, 32 s...).
#   LOCAL_SLURM_EXTRA        more slurm.conf lines, appended as given.
set -euo pipefail

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { die "usage: $0 start|stop|status DIR"; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$2

# PID from a PID file, but only while that PID still runs the program named (a stale file
# whose PID was reused must never lead to signalling an unrelated process).
pid_of() { # file program
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  case "$pid" in '' | *[!0-9]*) return 0 ;; esac
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then echo "$pid"; fi
}
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
wait_gone() { # pid seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do alive "$1" || return 0; sleep 0.1; done
  return 1
}

# The step daemons (slurmstepd) of this cluster's jobs: they carry SLURM_CONF in their
# environment (slurmd is started with it and passes its environment on). Used by `stop` to
# make sure no job outlives the cluster.
stepds() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    if tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$dir/slurm.conf"; then
      echo "${p#/proc/}"
    fi
  done
}

# SIGKILL to a process and all its descendants, the children first.
kill_tree() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$c"; done
  kill -KILL "$1" 2>/dev/null || true
}

# A port nobody listens on (the connect fails). Good enough for CI: two clusters started in
# the same instant could still pick the same port, and the loser fails to start, loudly.
free_port() { # from, not-this
  local p=$1
  while [ "$p" = "$2" ] || (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do
    p=$((p + 1))
    [ "$p" -lt 65536 ] || die "no free port"
  done
  echo "$p"
}

start() {
  local b
  for b in munged munge unmunge slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || die "$b missing: apt-get install -y --no-install-recommends slurm-wlm munge"
  done
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ "${#dir}" -le 70 ] || die "DIR $dir is longer than 70 characters (unix socket paths)"
  case "$dir" in *[[:space:],=]*) die "DIR must not hold spaces, ',' or '='" ;; esac
  if alive "$(pid_of "$dir/run/slurmctld.pid" slurmctld)"; then die "a cluster already runs in $dir"; fi
  # munged also wants every folder above its socket searchable by all (mktemp -d gives 0700).
  local up=$dir
  while [ "$up" != / ]; do
    [ "$(( $(stat -c '%#a' "$up") & 1 ))" = 1 ] || [ "$up" = "$dir" ] ||
      die "$up is not searchable by others (munged refuses that): chmod o+x $up"
    up=$(dirname "$up")
  done
  mkdir -p "$dir"/{munge,state,spool,log,run}
  # munged refuses a key or socket folder that others may write to.
  chmod 0755 "$dir" "$dir/munge"
  local t0=$SECONDS

  # munge: its own key and socket; Slurm is pointed at the socket by AuthInfo below.
  local sock=$dir/munge/munge.socket.2 key=$dir/munge/munge.key
  [ -s "$key" ] || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  chmod 0600 "$key"
  if ! alive "$(pid_of "$dir/munge/munged.pid" munged)"; then
    munged --key-file="$key" --socket="$sock" --pid-file="$dir/munge/munged.pid" \
      --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" ||
      die "munged did not start; see $dir/munge/munged.log"
  fi
  local i
  for ((i = 0; i < 50; i++)); do [ -S "$sock" ] && break; sleep 0.1; done
  munge -n -S "$sock" | unmunge -S "$sock" >/dev/null || die "munge does not work; see $dir/munge/munged.log"

  # The node as slurmd sees this machine (CPUs, sockets, cores, memory), named localhost so
  # that the host name does not matter. No cgroup plugins: containers rarely allow them.
  local hw ctld_port slurmd_port conf=$dir/slurm.conf
  hw=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')
  [ -n "$hw" ] || die "slurmd -C printed nothing"
  ctld_port=$(free_port "${LOCAL_SLURM_PORT:-6817}" "")
  slurmd_port=$(free_port $((ctld_port + 1)) "$ctld_port")
  : >"$dir/plugstack.conf" # else /etc/slurm/plugstack.conf would be read
  cat >"$conf" <<EOF
# Written by local-cluster.sh: a one-node test cluster, everything under $dir.
ClusterName=loci-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=${LOCAL_SLURM_CRED_EXPIRE:-10}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule at once and every second (defaults: up to 3 s, then every 60 s).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
MinJobAge=${LOCAL_SLURM_MIN_JOB_AGE:-300}
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -n "${LOCAL_SLURM_EXTRA:-}" ]; then printf '%s\n' "$LOCAL_SLURM_EXTRA" >>"$conf"; fi

  # Both daemons fork into the background and write their PID files.
  export SLURM_CONF=$conf
  slurmctld -f "$conf" || die "slurmctld did not start; see $dir/log/slurmctld.log"
  slurmd -f "$conf" -N localhost || die "slurmd did not start; see $dir/log/slurmd.log"
  local state=
  for ((i = 0; i < 240; i++)); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.25
  done
  if [ "$state" != idle ]; then
    tail -n 30 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    die "the node is not idle after 60 s (state '$state')"
  fi
  say "up in $((SECONDS - t0)) s in $dir (ports $ctld_port, $slurmd_port)"
  echo "export SLURM_CONF=$conf"
}

stop() {
  [ -d "$dir" ] || { say "no $dir: nothing to stop"; return 0; }
  dir=$(cd "$dir" && pwd)
  local conf=$dir/slurm.conf ctld slurmd munged i p
  ctld=$(pid_of "$dir/run/slurmctld.pid" slurmctld)
  slurmd=$(pid_of "$dir/run/slurmd.pid" slurmd)
  munged=$(pid_of "$dir/munge/munged.pid" munged)
  # Jobs first, while the daemons can still end them properly.
  if alive "$ctld" && alive "$slurmd"; then
    local jobs
    jobs=$(SLURM_CONF=$conf squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086 # a list of job IDs
      SLURM_CONF=$conf scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do
        [ -z "$(SLURM_CONF=$conf squeue -h 2>/dev/null)" ] && break
        sleep 0.1
      done
    fi
  fi
  for p in "$slurmd" "$ctld"; do [ -z "$p" ] || kill -TERM "$p" 2>/dev/null || true; done
  for p in "$slurmd" "$ctld"; do
    [ -n "$p" ] || continue
    wait_gone "$p" 15 || { say "pid $p ignores SIGTERM: SIGKILL"; kill -KILL "$p" 2>/dev/null || true; }
  done
  # A step daemon left by a job that would not end goes too, with its processes (the job's
  # script and what it started) first: they would outlive it otherwise.
  for p in $(stepds); do
    say "killing leftover slurmstepd $p and its processes"
    kill_tree "$p"
  done
  if alive "$munged"; then
    kill -TERM "$munged" 2>/dev/null || true
    wait_gone "$munged" 10 || kill -KILL "$munged" 2>/dev/null || true
  fi
  local left=
  for p in "$ctld" "$slurmd" "$munged" $(stepds); do
    if alive "$p"; then left+=" $p"; fi
  done
  [ -z "$left" ] || die "still running:$left"
  say "stopped (logs kept in $dir/log)"
}

status() {
  dir=$(cd "$dir" && pwd)
  local d pid
  for d in run/slurmctld run/slurmd munge/munged; do
    pid=$(pid_of "$dir/$d.pid" "${d#*/}")
    if alive "$pid"; then echo "${d#*/}: pid $pid"; else echo "${d#*/}: not running"; fi
  done
  if [ -f "$dir/slurm.conf" ]; then
    SLURM_CONF=$dir/slurm.conf sinfo 2>/dev/null || true
    SLURM_CONF=$dir/slurm.conf squeue 2>/dev/null || true
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
