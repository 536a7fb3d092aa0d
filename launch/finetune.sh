#!/usr/bin/env bash
# Slurm launcher: sbatch launch/finetune.sh [hydra overrides ...]
#
#   sbatch --nodes 2 --gpus-per-node 8 launch/finetune.sh experiment=gemma4_26b_sft model.hf_path=/ckpt/... \
#          data.path=/data/sft name=sft-v1
#
# Nodes and GPUs come from Slurm (SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE); one srun task per node runs torchrun
# with a c10d rendezvous on the first node. Slurm signals the job (USR1) two minutes before its time limit or
# on preemption; the batch shell forwards it to the training processes, which save a checkpoint and exit with
# status 75; the job is then requeued and, rerunning the same command (same name / run_dir), resumes.
#SBATCH --job-name=gemma4vl
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

nodes=${SLURM_JOB_NUM_NODES:-1}
gpus=${SLURM_GPUS_ON_NODE:-$(.venv/bin/python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
port=$((29500 + ${SLURM_JOB_ID:-0} % 1000))
echo "gemma4vl: ${nodes} node(s) x ${gpus} process(es), rendezvous ${head}:${port}, overrides: $*"

requeue=0
forward_signal() {
  echo "gemma4vl: caught $1, asking the training processes to checkpoint and stop"
  requeue=1
  [[ -n "${step_pid:-}" ]] && kill -s "$1" "$step_pid" 2>/dev/null
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/torchrun --nnodes ${nodes} --nproc-per-node ${gpus} --rdzv-backend c10d \
    --rdzv-endpoint ${head}:${port} --rdzv-id ${SLURM_JOB_ID:-gemma4vl} --no-python \
    .venv/bin/python -m recipes.finetune $(printf '%q ' "$@")" &
step_pid=$!
status=0
while true; do
  wait "$step_pid"; status=$?
  # wait returns early (status > 128) when a trapped signal arrives; keep waiting for the step itself.
  kill -0 "$step_pid" 2>/dev/null || break
done

if [[ $requeue -eq 1 || $status -eq 75 ]]; then
  echo "gemma4vl: stopped early (status $status); requeueing job ${SLURM_JOB_ID:-?}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$status"
