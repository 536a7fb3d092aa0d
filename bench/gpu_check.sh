#!/usr/bin/env bash
# The GPU check of the attention kernels and the step benchmark (issue 15, items 1 and 5), as one run that ends
# inside 8 minutes on one H100 / H200:
#
#   bash bench/gpu_check.sh OUT_DIR [PYTHON]
#
#   1. the `gpu`-marked tests of tests/test_attention_kernels.py (compiled FlexAttention forward + backward against
#      dense SDPA at head_dim 256 / 8 KV heads and 512 / 2 KV heads, fp32 and bf16; the tiny model's logits and
#      gradients with flex, and with flex under full recompute, against dense), at most 180 s;
#   2. bench/gpu_step.py, sections a, b, c, d, with what is left of the 470 s: sections not started 100 s before
#      the end are skipped. Its JSON is rewritten after every section, so a kill at the limit keeps what it measured.
#
# OUT_DIR receives gpu_tests.log, gpu_step.log, gpu_step.json and versions.txt. PYTHON defaults to .venv/bin/python
# when it exists, else python3. When a folder .whl/ exists in the repository root (the packages the machine lacks,
# as wheels: docs/performance.md says which), they are installed to /tmp/gemma4vl-site first and put on PYTHONPATH.
# Exit status: the tests' if they failed, else the benchmark's (1 if a section failed; skipped ones show in its table).
set -u
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [PYTHON]" >&2
    exit 2
fi
out_dir=$1
if [ $# -ge 2 ]; then
    python=$2
elif [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
budget_s=470   # 7 min 50 s in all
start=$(date +%s)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gemma4vl-site .whl/*.whl || { echo "installing .whl/*.whl failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/gemma4vl-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "python: $python"
    "$python" -c "import torch, transformers, megatron.core; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'); print('transformers', transformers.__version__, '| megatron-core', megatron.core.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} 2>&1 | tee "$out_dir/versions.txt"

echo "== gpu-marked attention tests (at most 180 s)"
timeout 180 "$python" -m pytest -m gpu tests/test_attention_kernels.py -q -p no:cacheprovider --durations=0 \
    2>&1 | tee "$out_dir/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== tests: exit status $tests_rc after $(( $(date +%s) - start )) s"

left=$(( budget_s - ($(date +%s) - start) ))
deadline=$(( left - 100 ))
if [ "$deadline" -lt 60 ]; then deadline=60; fi
echo "== bench/gpu_step.py (at most $left s; sections not started by $deadline s are skipped)"
timeout "$left" "$python" bench/gpu_step.py --deadline-s "$deadline" --json "$out_dir/gpu_step.json" \
    2>&1 | tee "$out_dir/gpu_step.log"
bench_rc=${PIPESTATUS[0]}
echo "== bench: exit status $bench_rc; total $(( $(date +%s) - start )) s"

if [ "$tests_rc" -ne 0 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
