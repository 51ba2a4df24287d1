#!/usr/bin/env bash
# Serving benchmark on the device (issue 8): pagoda serve with Llama-3.1-8B-shaped dummy weights,
# pagoda bench serve at several request rates, attention_backend pagoda vs flashinfer.
# Usage (repo root, on the device; .whl/ and .whl/srv/ carried): [BACKENDS="pagoda flashinfer"] bash scripts/serve_bench.sh [rates] [num_prompts]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/srv/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RATES=${1:-"4 16 64"}; N=${2:-120}
for backend in ${BACKENDS:-pagoda flashinfer}; do
  python3 -m pagoda serve Llama-3.1-8B --load-format dummy --attention-backend $backend --port 8000 \
    --max-model-len 4096 --log-level warning > "$OUT/server_$backend.log" 2>&1 &
  pid=$!
  for i in $(seq 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
  python3 -m pagoda bench serve --base-url http://127.0.0.1:8000 --num-prompts 32 --input-len 512 --output-len 64 \
    --vocab-size 128000 > /dev/null  # warm-up: kernel compilation and CUDA-graph capture
  for rate in $RATES; do
    echo "== $backend rate $rate"
    python3 -m pagoda bench serve --base-url http://127.0.0.1:8000 --num-prompts $N --request-rate $rate \
      --input-len 512 --output-len 256 --vocab-size 128000 --json "$OUT/serve_${backend}_$rate.json"
  done
  kill -TERM $pid; wait $pid; echo "server exit code $?"
done
