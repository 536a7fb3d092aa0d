#!/usr/bin/env bash
# A throwaway single-node Slurm on this machine (munged + slurmctld + slurmd, Debian's slurm-wlm packages), for
# the launcher's tests and for trying launch/finetune.sh without a cluster. Everything lives in one directory:
# configuration, state, spool, logs, munge key and socket; the daemons listen on free ports, so several
# instances (e.g. concurrent test runs) coexist on one machine.
#
#   launch/slurm_local/slurm_local.sh start DIR [--gpus N]   # install when missing, configure, start, wait idle
#   export SLURM_CONF=DIR/slurm.conf                          # every Slurm client needs it (sbatch, squeue, ...)
#   sbatch --gpus-per-node 0 --ntasks-per-node 2 launch/finetune.sh ...        # from the checkout: 2 CPU ranks
#   launch/slurm_local/slurm_local.sh stop DIR                # cancel jobs, stop their processes and the daemons
#   launch/slurm_local/slurm_local.sh install                 # only install slurm-wlm and munge (apt-get, root)
#
# --gpus N declares N GPUs on the node (gres/gpu backed by placeholder device files, DIR/dev/nvidia*, like
# /dev/null) so that GPU requests such as `--gpus-per-node 2` can be scheduled; no device is behind them: the
# trainer must still run with trainer.device=cpu. Runs as root (the daemons run as SlurmUser=root). Why the
# configuration looks the way it does: docs/slurm.md ("Trying it on one machine").
set -euo pipefail

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

PACKAGES=(slurm-wlm munge)
DAEMONS=(munged slurmctld slurmd)

install() {
  local missing=()
  for cmd in "${DAEMONS[@]}" sbatch scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "${missing[*]} not installed and not running as root: install ${PACKAGES[*]} (apt-get)"
  command -v apt-get >/dev/null 2>&1 || die "${missing[*]} not installed and apt-get not available: install ${PACKAGES[*]}"
  echo "slurm_local.sh: installing ${PACKAGES[*]} (missing: ${missing[*]})" >&2
  local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${PACKAGES[@]}" >&2; then
    # A fresh machine may have no package lists yet.
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${PACKAGES[@]}" >&2 || die "apt-get install ${PACKAGES[*]} failed"
  fi
  for cmd in "${missing[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing ${PACKAGES[*]}"
  done
}

free_port() {
  # A TCP port (20000-49999) no socket of this machine uses now, for slurmctld and slurmd.
  local used=" " addr port _
  while read -r _ addr _; do used+="$((16#${addr##*:})) "; done < <(tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 30000))
    [[ "$used" == *" $port "* ]] || { echo "$port"; return 0; }
  done
  die "no free TCP port found"
}

write_conf() {
  local dir=$1 gpus=$2 node cpus mem ctld_port slurmd_port
  node=$(hostname -s)
  cpus=$(nproc)
  # RealMemory must not exceed what slurmd measures, or the node is drained ("Low RealMemory").
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  [[ -n "$mem" ]] || die "could not read RealMemory from 'slurmd -C'"
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [[ "$slurmd_port" == "$ctld_port" ]]; do slurmd_port=$(free_port); done
  mkdir -p "$dir"/{state,log,run,munge} "$dir/spool/slurmd-${node}"
  chmod 755 "$dir" "$dir/munge"  # munged refuses a socket directory that is not world-executable
  local gres_line="" node_gres=""
  if [[ "$gpus" -gt 0 ]]; then
    gres_line="GresTypes=gpu"
    node_gres="Gres=gpu:${gpus}"
    # gres/gpu needs device files: character devices like /dev/null (1,3), one per GPU, nvidia0..N-1.
    mkdir -p "$dir/dev"
    local i
    for ((i = 0; i < gpus; i++)); do [[ -e "$dir/dev/nvidia$i" ]] || mknod "$dir/dev/nvidia$i" c 1 3; done
    echo "Name=gpu File=${dir}/dev/nvidia[0-$((gpus - 1))]" >"$dir/gres.conf"
  fi
  cat >"$dir/slurm.conf" <<EOF
# Throwaway single-node Slurm written by launch/slurm_local/slurm_local.sh
ClusterName=local
SlurmctldHost=${node}
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it runs again (default 120 s).
AuthInfo=socket=${dir}/munge/munge.socket.2,cred_expire=5
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool/slurmd-%n
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${dir}/run/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${dir}/log/jobcomp.log
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
# Finished jobs stay visible to `scontrol show job` for 16 s (jobcomp.log keeps them all). It also sets how often
# `sbatch --wait` polls: every 2 s, then every 8 s (with the default 300 s: 2, 8, then 32 s).
MinJobAge=16
KillWait=30
${gres_line}
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} ${node_gres} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_of() { [[ -s "$1" ]] && cat "$1" || true; }

start() {
  local dir=$1 gpus=$2
  [[ -e "$dir/slurm.conf" ]] && [[ -n "$(pid_of "$dir/run/slurmctld.pid")" ]] && \
    kill -0 "$(pid_of "$dir/run/slurmctld.pid")" 2>/dev/null && die "a Slurm is already running from $dir"
  install
  [[ $(id -u) -eq 0 ]] || die "the local Slurm runs its daemons as root; run as root"
  write_conf "$dir" "$gpus"
  # Whatever fails from here on: stop what was started.
  trap 'echo "slurm_local.sh: start failed, stopping what was started in $dir" >&2; stop "$dir"' EXIT
  export SLURM_CONF="$dir/slurm.conf"
  local sock="$dir/munge/munge.socket.2"
  if [[ ! -s "$dir/munge/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
  fi
  munged --key-file="$dir/munge/munge.key" --socket="$sock" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || die "munged did not start (see $dir/log/munged.log)"
  munge -S "$sock" -n | unmunge -S "$sock" >/dev/null || die "munge round trip failed (see $dir/log/munged.log)"
  slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
  slurmd -f "$SLURM_CONF" || die "slurmd did not start (see $dir/log/slurmd.log)"
  local state="" i
  for i in $(seq 1 300); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    [[ "$state" == "idle" ]] && break
    sleep 0.1
  done
  [[ "$state" == "idle" ]] || die "node not idle after 30 s (state '${state}'); logs in $dir/log"
  trap - EXIT
  echo "export SLURM_CONF=$SLURM_CONF"
}

# Processes of this instance's jobs: the step daemons (slurmstepd, which outlive slurmd) and the jobs' processes.
# Both carry SLURM_CONF=<this conf> in their environment (slurmd was started with it, and sbatch exports the
# submitter's environment); the job processes also carry SLURM_JOB_ID, which a shell that merely exported
# SLURM_CONF (e.g. the one running this script) does not.
instance_pids() {
  local conf=$1 env pid
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [[ "$pid" == "$$" ]] && continue
    grep -qzx "SLURM_CONF=${conf}" "$env" 2>/dev/null || continue
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || grep -qz "^SLURM_JOB_ID=" "$env" 2>/dev/null; then
      echo "$pid"
    fi
  done
  true
}

alive() {  # a process that still runs (an exited one waiting to be reaped is a zombie, state Z, and counts as gone)
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

wait_gone() {  # wait_gone SECONDS PID...: until none of the PIDs lives
  local seconds=$1 i p alive
  shift
  for i in $(seq 1 $((seconds * 10))); do
    alive=0
    for p in "$@"; do alive "$p" && alive=1; done
    [[ $alive -eq 0 ]] && return 0
    sleep 0.1
  done
  return 1
}

stop() {
  local dir=$1 conf="$1/slurm.conf" pids=() p d
  [[ -f "$conf" ]] || die "no $conf: nothing to stop"
  local ctld; ctld=$(pid_of "$dir/run/slurmctld.pid")
  if [[ -n "$ctld" ]] && kill -0 "$ctld" 2>/dev/null; then
    SLURM_CONF="$conf" scancel --quiet --full --signal=KILL 2>/dev/null || true
    SLURM_CONF="$conf" scancel --quiet 2>/dev/null || true
  fi
  # Job processes and step daemons first (they outlive slurmd), then the daemons.
  mapfile -t pids < <(instance_pids "$conf")
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  local daemons=()
  for d in slurmd slurmctld munged; do
    p=$(pid_of "$dir/run/$d.pid")
    # Only the daemon that wrote the pid file (a stale file's pid may belong to someone else by now).
    [[ -n "$p" && "$(cat "/proc/$p/comm" 2>/dev/null)" == "$d" ]] && kill -TERM "$p" 2>/dev/null && daemons+=("$p")
  done
  if [[ ${#daemons[@]} -gt 0 ]] && ! wait_gone 10 "${daemons[@]}"; then
    for p in "${daemons[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait_gone 5 "${daemons[@]}" || die "daemons ${daemons[*]} still alive after SIGKILL"
  fi
  # Whatever is left of this instance's jobs (e.g. a step started while we were stopping).
  mapfile -t pids < <(instance_pids "$conf")
  local left=()
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null && left+=("$p"); done
  [[ ${#left[@]} -eq 0 ]] || wait_gone 5 "${left[@]}" || die "processes ${left[*]} of $dir survived SIGKILL"
}

cmd=${1:-}
case "$cmd" in
  install) install ;;
  start)
    [[ $# -ge 2 ]] || die "usage: $0 start DIR [--gpus N]"
    dir=$(realpath -m "$2"); gpus=0
    if [[ "${3:-}" == "--gpus" ]]; then
      gpus=${4:-}
      [[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus needs a count, got '${gpus}'"
    fi
    start "$dir" "$gpus" ;;
  stop)
    [[ $# -eq 2 ]] || die "usage: $0 stop DIR"
    stop "$(realpath -m "$2")" ;;
  *) die "usage: $0 {start DIR [--gpus N] | stop DIR | install}" ;;
esac
