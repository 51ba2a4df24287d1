#!/usr/bin/env bash
# One device call: benchmarks, then GPU tests; a short table last.
# Usage (from the repo root, on the device): bash scripts/gpu_check.sh [attention-bench args...]
#   (e.g. --only decode --no-flex --kernel-times: the decode table, and each library's kernel time from the
#   profiler beside the graph replay's, which holds the replay's ~3.6 us launch: bench.attention.kernel_time;
#   and each library's cost inside a larger graph and in a step's PDL chain: in_graph_time, step_time)
#   TESTS=tests/ops    which GPU tests to run (default: tests; SKIP_TESTS=1 runs none)
#   TEST_PART=gpu_py | rest   half of the suite (the whole no longer fits one call): tests/attention/test_gpu.py, or
#                             the rest (engine tests and timing tests apart, as the default); WORKERS=12 xdist workers
#   BENCHES="ops attention cascade decode_sweep linear mla engine"   which pagoda.bench modules to run (default:
#                                     attention);
#                                     "fp8" is the attention bench's decode over an fp8 cache, "fp8-triton" the
#                                     same with the Triton kernel instead of the Gluon one (PAGODA_FP8_DECODE_KERNEL)
#   ENGINE_AB=DIR                     also the engine's batch-1 / batch-64 latency, this tree against the pagoda
#                                     package in DIR (e.g. ab_base/ from `git archive REV pagoda | tar -x -C ab_base`,
#                                     carried), interleaved over two rounds, a table last
#   ENGINE_ARGS="--model Gemma-2-9B --max-model-len 8192"   more arguments of the engine runs of ENGINE_AB / ENGINE_ENV_AB
#   ENGINE_ENV_AB="A;B;..."           also the engine's latency under each environment setting (e.g.
#                                     "PAGODA_DEFER_NORMS=0;PAGODA_SMALL_M_LINEAR=qkv,o,down PAGODA_SMALL_M_SPLIT=down=4"),
#                                     this tree, interleaved over ENV_ROUNDS rounds (default 2), a table last
# Peers travel as wheels in .whl/ (../shared/scripts/peer-wheels.sh) and are installed here.
set -u
case "${TEST_PART:-}" in
  ""|gpu_py|rest) ;;
  *) echo "TEST_PART must be gpu_py or rest, got $TEST_PART" >&2; exit 2 ;;
esac
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,driver_version --format=csv,noheader  # (machines of one kind differ: session 18 had 4.41 vs 4.59 ms per batch-1 token)
# clocks, power and the driver's clock-event (throttle) reasons sampled every 200 ms while the call runs, summed
# up at the end over the samples under load (machines of one kind differ by up to 0.07-0.17 ms per batch-1 token:
# session 21 had a machine whose decode kernel ran 8-15% slower than others' while SDPA's did not)
CLK_FIELDS=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$CLK_FIELDS --format=csv,noheader,nounits >/dev/null 2>&1 \
  || CLK_FIELDS=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active
nvidia-smi --query-gpu=$CLK_FIELDS --format=csv,noheader,nounits -lms 200 > "$OUT/clocks.csv" 2>/dev/null &
CLK_PID=$!
for b in ${BENCHES-attention}; do
  if [ "$b" = attention ]; then
    python3 -m pagoda.bench.attention --json "$OUT/bench_$b.json" "$@" 2>&1 | tee "$OUT/bench_$b.log"
  elif [ "$b" = fp8 ] || [ "$b" = fp8-triton ]; then  # decode over an fp8 (e4m3) cache vs 16-bit KV and FlashInfer fp8
    PAGODA_FP8_DECODE_KERNEL=$([ "$b" = fp8-triton ] && echo triton || echo auto) \
      python3 -m pagoda.bench.attention --only decode --kv-dtype float8_e4m3fn --no-flex --json "$OUT/bench_$b.json" \
      2>&1 | tee "$OUT/bench_$b.log"
  else
    python3 -m pagoda.bench."$b" --json "$OUT/bench_$b.json" 2>&1 | tee "$OUT/bench_$b.log"
  fi
done
if [ -n "${ENGINE_AB:-}" ]; then  # same machine, interleaved: machines of one kind differ by ~1%
  for r in 1 2; do
    for side in base new; do
      root=$([ $side = base ] && echo "$PWD/$ENGINE_AB" || echo "$PWD")
      # (run from the root: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH, so a
      # base tree given by PYTHONPATH alone would be shadowed by this one; session 17's first A/B was void so)
      line=$(cd "$root" && PYTHONPATH=$root:${PYTHONPATH#$PWD:} python3 -m pagoda.bench.engine --cases latency \
             --backends pagoda ${ENGINE_ARGS:-} 2>&1 | grep '^pagoda latency')
      echo "engine_ab round $r $side: $line" | tee -a "$OUT/engine_ab.log"
    done
  done
fi
if [ -n "${ENGINE_ENV_AB:-}" ]; then
  IFS=';' read -r -a settings <<< "$ENGINE_ENV_AB"
  for r in $(seq 1 "${ENV_ROUNDS:-2}"); do
    for setting in "${settings[@]}"; do
      line=$(env $setting python3 -m pagoda.bench.engine --cases latency --backends pagoda ${ENGINE_ARGS:-} 2>&1 \
             | grep '^pagoda latency')
      echo "engine_env round $r [$setting]: $line" | tee -a "$OUT/engine_env.log"
    done
  done
fi
# tests after the benchmarks: the whole GPU suite takes ~4-8 minutes, and a call that runs out of time should
# still bring back the numbers (session 7 lost its benchmarks that way)
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # pytest-xdist (in the device image): 8 workers share the GPU; the whole suite took 3.6 min (session 11)
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
  # (the multigpu tests, tensor parallelism over NCCL, need two GPUs: left out on a machine of one)
  MARK=$([ "$(nvidia-smi -L | wc -l)" -ge 2 ] && echo gpu || echo "gpu and not multigpu")
  # (the engine tests apart: their KV pools take a fraction of the free GPU memory, which failed 61 attention tests
  # in other workers of one session, session 42)
  # (the timing tests, which assert how long GPU work takes, alone after the others: beside 7 other workers
  # test_step_time_overlaps_a_pdl_launch failed, session 43)
  # (the whole suite no longer fits one 600 s call with a machine start: tests/attention/test_gpu.py alone took ~600 s
  # under 12 workers, session 44; TEST_PART=gpu_py runs that file, TEST_PART=rest everything else, one call each)
  if [ "${TEST_PART:-}" = gpu_py ]; then
    TESTS=tests/attention/test_gpu.py
  elif [ "${TEST_PART:-}" = rest ]; then
    python3 -m pytest -q -rf -m "$MARK and not timing" $XDIST tests --ignore=tests/engine \
      --ignore=tests/attention/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
    python3 -m pytest -q -rf -m "$MARK and not timing" $XDIST tests/engine 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 15
    python3 -m pytest -q -rf -m "$MARK and timing" tests 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 15
  fi
  if [ "${TEST_PART:-}" = rest ]; then
    :
  elif [ -n "${TESTS:-}" ]; then
    python3 -m pytest -q -rf -m "$MARK and not timing" $XDIST $TESTS 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
    python3 -m pytest -q -rf -m "$MARK and timing" $TESTS 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 15
  else
    python3 -m pytest -q -rf -m "$MARK and not timing" $XDIST tests --ignore=tests/engine 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -n 15
    python3 -m pytest -q -rf -m "$MARK and not timing" $XDIST tests/engine 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 15
    python3 -m pytest -q -rf -m "$MARK and timing" tests 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -n 15
  fi
fi
for b in ${BENCHES-attention}; do  # the short table last
  echo "== $b"; grep -v '^#' "$OUT/bench_$b.log" | tail -n 12
done
if [ -n "${ENGINE_ENV_AB:-}" ]; then
  echo "== engine settings (ms per token, batch 1 / 64)"
  sed -E "s/^engine_env (round [0-9]+) (\[[^]]*\]): .*'batch': 1, [^}]*'ms_per_token': ([0-9.]+).*'batch': 64, [^}]*'ms_per_token': ([0-9.]+).*/\1 \2: \3 \4/" "$OUT/engine_env.log"
fi
if [ -n "${ENGINE_AB:-}" ]; then
  echo "== engine A/B (ms per token, batch 1 / 64)"
  sed -E "s/^engine_ab (round [0-9]) ([a-z]+): .*'batch': 1, [^}]*'ms_per_token': ([0-9.]+).*'batch': 64, [^}]*'ms_per_token': ([0-9.]+).*/\1 \2: \3 \4/" "$OUT/engine_ab.log"
fi
kill "$CLK_PID" 2>/dev/null
python3 - "$OUT/clocks.csv" <<'PYEOF'
import statistics, sys
rows = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    try:
        rows.append((float(f[0]), float(f[1]), float(f[2]), float(f[3]), f[4]))
    except (ValueError, IndexError):
        pass
busy = [r for r in rows if r[2] > 150.0]  # (watts: samples under load)
if busy:
    sm = [r[0] for r in busy]
    reasons = sorted({r[4] for r in busy})
    print(f"== clocks under load ({len(busy)} of {len(rows)} samples > 150 W): SM median {statistics.median(sm):.0f} "
          f"min {min(sm):.0f} max {max(sm):.0f} MHz, mem {statistics.median(r[1] for r in busy):.0f} MHz, power median "
          f"{statistics.median(r[2] for r in busy):.0f} max {max(r[2] for r in busy):.0f} W, temp max "
          f"{max(r[3] for r in busy):.0f} C, event reasons {reasons}")
else:
    print(f"== clocks: no samples under load ({len(rows)} samples)")
PYEOF
