#!/usr/bin/env bash
# Slurm launcher:  sbatch [sbatch options] launch/finetune.sh [--shutdown-window SECONDS] [hydra overrides ...]
#
#   sbatch launch/finetune.sh experiment=gemma4_26b_sft model.hf_path=/ckpt/gemma-4-26B-A4B data.path=/data/sft
#   sbatch --nodes 2 --time 12:00:00 launch/finetune.sh experiment=gemma4_26b_sft name=sft-v2 ...
#   sbatch --gpus-per-node 0 --ntasks-per-node 2 launch/finetune.sh trainer=cpu ...    # CPU mode (gloo)
#
# Submit from the gemma4vl checkout (the job runs `python -m recipes.finetune` in the submit directory, where
# relative paths in the overrides resolve). Python: $PYTHON, else the `python` of the environment active at
# submission (sbatch exports it), else python3. Details, logs and outputs: docs/slurm.md.
#
# Layout: one Slurm task per GPU (srun starts every rank itself: RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID,
# WORLD_SIZE = SLURM_NTASKS, rendezvous on the first node). So every signal Slurm sends to the job's steps reaches
# each trainer directly, and srun's exit status is the trainers' own (75 = checkpoint saved, see docs/training.md).
# Without GPUs (--gpus-per-node 0) it is the CPU mode: --ntasks-per-node gloo processes per node.
#
# Preemption and time limits: Slurm sends USR1 to this batch shell --signal's lead seconds before the time limit
# (and `scancel --signal=USR1 --full` / `--batch` does the same); the shell passes it on to every rank (again every
# 30 s while they run: a rank still importing ignores it), each finishes its step, they save one checkpoint
# together and exit 75, and the shell requeues the job. The requeued job runs the same command
# (SLURM_RESTART_COUNT=1, 2, ...) and resumes from that checkpoint. Any other status ends the job without a
# requeue, as does a SIGTERM (scancel, Slurm's own preemption, the end of the time limit). The lead (900 s) must
# exceed one step plus one checkpoint save of the model at hand, and the time limit must exceed lead + 30 s.
#SBATCH --job-name=gemma4vl
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

EXIT_PREEMPTED=75  # the trainer's status after a signal made it save a checkpoint (gemma4vl/training/finetune.py)

die() {
  echo "launch/finetune.sh: error: $*" >&2
  exit 2
}

# Seconds srun lets the other ranks finish after the first rank exits before it stops them: long enough for
# rank 0 to finish a large checkpoint or export after the others are done; it also bounds how long ranks hang
# in a collective after one rank crashed (instead of trainer.distributed_timeout_minutes).
shutdown_window=900
if [[ "${1:-}" == "--shutdown-window" ]]; then
  shutdown_window=${2:-}
  shift 2 || true
fi
[[ "$shutdown_window" =~ ^[1-9][0-9]*$ ]] ||
  die "--shutdown-window must be a positive number of seconds, got '${shutdown_window}'"

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job: submit it with 'sbatch launch/finetune.sh overrides...'.
  Without Slurm, on one machine: launch/torchrun.sh; a throwaway local Slurm to try this script:
  launch/slurm_local/slurm_local.sh (docs/slurm.md)."
cd "${SLURM_SUBMIT_DIR:?}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR}"

# --- counts: one task per GPU, the same number on every node --------------------------------------------------
nodes=${SLURM_JOB_NUM_NODES:?}
ntasks=${SLURM_NTASKS:-}
[[ -n "$ntasks" ]] || die "SLURM_NTASKS is not set: give sbatch --ntasks-per-node (one task per GPU)"
(( ntasks % nodes == 0 )) || die "${ntasks} tasks do not split evenly over ${nodes} nodes: use --ntasks-per-node"
tasks_per_node=$((ntasks / nodes))
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" && "${SLURM_NTASKS_PER_NODE}" != "$tasks_per_node" ]]; then
  die "--ntasks-per-node=${SLURM_NTASKS_PER_NODE} but ${ntasks} tasks on ${nodes} node(s) is ${tasks_per_node} per node"
fi
# GPUs asked per node (--gpus-per-node [type:]N; with --exclusive SLURM_GPUS_ON_NODE counts all of the node's).
gpus_per_node=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
gpus_per_node=${gpus_per_node##*:}
[[ "$gpus_per_node" =~ ^[0-9]+$ ]] ||
  die "cannot read a GPU count from SLURM_GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-}: use --gpus-per-node N"
if (( gpus_per_node > 0 )); then
  (( tasks_per_node == gpus_per_node )) ||
    die "${tasks_per_node} task(s) per node but ${gpus_per_node} GPU(s) per node: one task per GPU \
(sbatch --ntasks-per-node=${gpus_per_node}, or --gpus-per-node=${tasks_per_node})"
  mode="GPU (NCCL), ${gpus_per_node} GPU(s) per node"
else
  mode="CPU (gloo, no GPUs allocated; the run must use trainer.device=cpu)"
fi
cpus_per_task=$(( ${SLURM_CPUS_ON_NODE:-$tasks_per_node} / tasks_per_node ))
(( cpus_per_task >= 1 )) ||
  die "${SLURM_CPUS_ON_NODE} CPU(s) on the node for ${tasks_per_node} tasks: ask for more CPUs"

# --- python --------------------------------------------------------------------------------------------------
PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
[[ -n "$PYTHON" ]] || die "no python on PATH: activate the environment where gemma4vl is installed, or set PYTHON"
found=$("$PYTHON" -c 'import importlib.util as u
print("ok" if u.find_spec("gemma4vl") and u.find_spec("recipes.finetune") else "missing")' 2>/dev/null)
[[ "$found" == ok ]] ||
  die "${PYTHON} cannot import gemma4vl and recipes.finetune from ${PWD}: submit from the gemma4vl \
checkout with its environment active (or set PYTHON=/path/to/env/bin/python)"

# --- rendezvous ----------------------------------------------------------------------------------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# One port per job (so jobs sharing a node do not collide); MASTER_PORT in the submitting environment wins.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT PYTHON
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}

echo "gemma4vl: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}: ${nodes} node(s) x \
${tasks_per_node} task(s), ${mode}; rendezvous ${MASTER_ADDR}:${MASTER_PORT}; python ${PYTHON}; overrides: $*"

# --- signals: pass USR1 on to every rank; requeue after the save ---------------------------------------------
RESEND_EVERY=30  # seconds: a rank still starting up (before its handler exists) ignores SIGUSR1, so repeat it
signalled=""
last_sent=0
send_usr1() {
  last_sent=$SECONDS
  # Every process of the job's steps (each rank on each node), through slurmctld and the step daemons.
  scancel --signal=USR1 "$SLURM_JOB_ID" || echo "gemma4vl: could not pass SIGUSR1 on to the ranks"
}
on_signal() {
  [[ -n "$signalled" ]] && return  # once (scancel --full signals this shell and the ranks alike)
  signalled=$1
  if [[ "$1" == USR1 ]]; then
    echo "gemma4vl: caught SIGUSR1: every rank saves a checkpoint after its current step"
    send_usr1
  else
    echo "gemma4vl: caught SIG$1 (Slurm is ending the job)"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# Each task becomes one rank: the torchrun variables from Slurm's, SIGUSR1 ignored until the trainer installs its
# handler (it would otherwise end a rank that is still importing), then exec: the trainer is the task's process.
srun --ntasks="$ntasks" --ntasks-per-node="$tasks_per_node" --cpus-per-task="$cpus_per_task" \
  --kill-on-bad-exit=0 --wait="$shutdown_window" \
  bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
             LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
           trap "" USR1
           exec "$PYTHON" -m recipes.finetune "$@"' finetune "$@" &
step_pid=$!
# Wait in short sleeps (a trap interrupts `wait`), repeating SIGUSR1 while the ranks live, then take the status.
while kill -0 "$step_pid" 2>/dev/null; do
  sleep 1 &
  wait $!
  if [[ "$signalled" == USR1 ]] && (( SECONDS - last_sent >= RESEND_EVERY )) && kill -0 "$step_pid" 2>/dev/null; then
    echo "gemma4vl: the ranks are still running; passing SIGUSR1 on again"
    send_usr1
  fi
done
wait "$step_pid"
status=$?

if (( status == 0 )); then
  echo "gemma4vl: done"
  exit 0
fi
if (( status == EXIT_PREEMPTED )); then
  if [[ "$signalled" == TERM ]]; then
    # scancel, or Slurm's own preemption (which requeues the job itself when it may), or the end of the time limit.
    echo "gemma4vl: checkpoint saved; the job was terminated (SIGTERM): not requeueing it"
    exit "$status"
  fi
  echo "gemma4vl: checkpoint saved; requeueing job ${SLURM_JOB_ID}"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "gemma4vl: scontrol requeue failed: resubmit the same command to resume"
    exit "$status"
  fi
  exit 0
fi
echo "gemma4vl: the run failed with status ${status}; not requeued"
exit "$status"
