#!/usr/bin/env bash
# Single-node launcher: one process per device (GPU, or CPU process with trainer.device=cpu).
#
#   launch/torchrun.sh [--nproc N] [hydra overrides ...]
#   launch/torchrun.sh --nproc 8 experiment=gemma4_26b_sft model.hf_path=/ckpt/gemma-4-26B-A4B data.path=...
#   launch/torchrun.sh --nproc 2 experiment=tiny_tp2            # CPU: 2 gloo processes
#
# N defaults to the number of visible GPUs (1 without GPUs). Exit status: the recipe's (0 done; 75 stopped by
# SIGTERM/SIGUSR1 after saving a checkpoint, see recipes/finetune.py), or torchrun's when a worker failed.
set -euo pipefail
cd "$(dirname "$0")/.."

nproc=""
if [[ "${1:-}" == "--nproc" ]]; then
  nproc="$2"
  shift 2
fi
if [[ -z "$nproc" ]]; then
  nproc=$(.venv/bin/python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/torchrun.sh: --nproc must be a positive integer, got '$nproc'" >&2
  exit 2
fi

status=0
.venv/bin/torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" --no-python \
  .venv/bin/python -m recipes.finetune "$@" || status=$?
exit "$status"
