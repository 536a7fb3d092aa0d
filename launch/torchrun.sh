#!/usr/bin/env bash
# Single-node launcher: one process per device (GPU, or CPU process with trainer.device=cpu).
#
#   launch/torchrun.sh [--nproc N] [hydra overrides ...]
#   launch/torchrun.sh --nproc 8 experiment=gemma4_26b_sft model.hf_path=/ckpt/gemma-4-26B-A4B data.path=...
#   launch/torchrun.sh --nproc 2 experiment=tiny_tp2            # CPU: 2 gloo processes
#
# N defaults to the number of visible GPUs (1 without GPUs). Python: $PYTHON, else the `python` of the active
# environment, else python3. Exit status: the recipe's (0 done; 75 stopped by SIGTERM/SIGUSR1 after saving a
# checkpoint, see recipes/finetune.py), or torchrun's when a worker failed. On a Slurm cluster: launch/finetune.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z "$PYTHON" ]] || ! "$PYTHON" -c 'import importlib.util as u, sys
sys.exit(u.find_spec("gemma4vl") is None or u.find_spec("torch") is None)' 2>/dev/null; then
  echo "launch/torchrun.sh: '${PYTHON:-python}' cannot import gemma4vl and torch: activate the environment where" \
       "gemma4vl is installed, or set PYTHON=/path/to/env/bin/python" >&2
  exit 2
fi

nproc=""
if [[ "${1:-}" == "--nproc" ]]; then
  nproc="$2"
  shift 2
fi
if [[ -z "$nproc" ]]; then
  nproc=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/torchrun.sh: --nproc must be a positive integer, got '$nproc'" >&2
  exit 2
fi

status=0
"$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc" --no-python \
  "$PYTHON" -m recipes.finetune "$@" || status=$?
exit "$status"
