#!/usr/bin/env bash
# One device call: GPU tests, then the attention benchmark; a short table last.
# Usage (from the repo root, on the device): bash scripts/gpu_check.sh [bench args...]
# Peers travel as wheels in .whl/ (../shared/scripts/peer-wheels.sh) and are installed here.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -x -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
fi
python3 -m pagoda.bench.attention --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
