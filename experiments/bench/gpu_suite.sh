#!/usr/bin/env bash
# The GPU figures of experiments/bench/gpu_train.py, one JSON per configuration, in priority order (the
# issue's headline figure first, so a run cut short still brings back the most important ones):
#
#   bash experiments/bench/gpu_suite.sh [OUT_DIR] [STEPS]
#
# OUT_DIR (default experiments/results/bench/gpu) receives gpu_train_<size>_<mode>.json and suite.log.
# STEPS timed optimizer steps per run (default 6, after 2 warm-up steps; batch 1 x grad_accum 4 x 4096).
# GPU_SUITE_EXTRA=--quick runs every step at toy size (a check of the script on a CPU).
# GPU_SUITE_REPEATS runs per side of each configuration (default 1: a GPU call is time-boxed; gpu_train's own
# default is 3, the sides' order alternating); the time limits below scale with it.
# Each configuration runs under its own time limit, so one that hangs does not take the rest with it.
set -u -o pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=${1:-$REPO/experiments/results/bench/gpu}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)  # absolute: the runs below start in the repository
STEPS=${2:-6}
THREADS=${BENCH_THREADS:-8}
REPEATS=${GPU_SUITE_REPEATS:-1}
export PYTHONUNBUFFERED=1 BENCH_WORKER_MAX_RSS_GB=${BENCH_WORKER_MAX_RSS_GB:-100}
cd "$REPO"
LOG="$OUT_DIR/suite.log"
echo "gpu_suite: $(date -u +%FT%TZ) steps=$STEPS threads=$THREADS repeats=$REPEATS" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

run() {  # run LIMIT_S NAME ARGS...
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$((limit * REPEATS))" python3 experiments/bench/gpu_train.py --threads "$THREADS" --steps "$STEPS" --warmup 2 --repeats "$REPEATS" \
    --out "$OUT_DIR/gpu_train_$name.json" "$@" ${GPU_SUITE_EXTRA:-} 2>&1 | tee -a "$LOG" | grep -E '^\[gpu_train\]|Error|error:' 
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

run 200 8b_lora --size 8b --mode lora
run 120 1b_lora --size 1b --mode lora
run 100 smollm2_lora --size smollm2 --mode lora
run 240 8b_full --size 8b --mode full
# torch.compile: about 150 s of compiling before the first step, so only on request (GPU_SUITE_COMPILE=1)
if [ -n "${GPU_SUITE_COMPILE:-}" ]; then
  run 240 8b_lora_compile --size 8b --mode lora --compile --no-trl
  run 240 8b_lora_compile_bs2 --size 8b --mode lora --compile --no-trl --batch-size 2 --grad-accum 2
fi
exit 0
