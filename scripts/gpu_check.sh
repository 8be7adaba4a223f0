#!/usr/bin/env bash
# The GPU checks in one short run, for a session that is lent a GPU machine (see README, Speed).
#
#   bash scripts/gpu_check.sh --prepare      # here, once: the wheel and photos the GPU machine lacks
#   bash scripts/gpu_check.sh [BENCH ARGS]   # there: tests/sam/test_cuda.py, then scripts/bench_gpu.py
#
# --prepare downloads Meta's segment-anything wheel (pure Python, 36 KB) into .whl/ and copies
# eight shared photos into .gpu_photos/; both folders are git-ignored, so name them in the device
# run's `carry`. The run installs the carried wheel into /tmp/site, runs the CUDA tests, then the
# benchmark (default vit_t, vit_b and vit_h; fp32, bf16 and fp16; batches 1 and 8), and writes
# the log, CSVs, JSON and chart to $OUT (else runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl segment-anything==1.0
    mkdir -p .gpu_photos
    for path in ../shared/data/dreambooth/dog/0[0-4].jpg ../shared/data/perseg_subset/Images/cat/0[0-2].jpg; do
        cp "$path" ".gpu_photos/$(basename "$(dirname "$path")")-$(basename "$path")"
    done
    echo "prepared: $(ls .whl) and $(ls .gpu_photos | wc -l) photos in .gpu_photos; carry .whl and .gpu_photos"
    exit 0
fi

out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
photos=()
[[ -d .gpu_photos ]] && photos=(--photos .gpu_photos)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -m pytest -q -p no:cacheprovider tests/sam/test_cuda.py || echo "tests/sam/test_cuda.py: FAILED"
    python3 scripts/bench_gpu.py "${photos[@]}" --out "$out" "$@"
} 2>&1 | tee "$out/gpu_check.log"
