#!/usr/bin/env bash
# On the GPU machine, in the repository's root (the device tool's `run`), after experiments/gpu/pack.py built
# the carry folders here. Two calls, the second at once while the machine is still warm:
#
#   bash experiments/gpu/device.sh stash     # carry .gpu_carry/a: checks the model's first part, keeps it in /tmp/atlas_gpu
#   bash experiments/gpu/device.sh run [ARGS] # carry .gpu_carry/b: joins the model (sha256 checked), unpacks the
#                                            # packages into /tmp/site and the data, runs experiments/gpu/run.py [ARGS] into $OUT
#
# `run` gives run.py what is left of the call's 600 s (CALL_S) less 30 s; its results come back from $OUT as
# they are made (summary.json, report.md, log.txt, runs.tar.gz) and console.txt, also if the call is cut.
set -u -o pipefail
STASH=/tmp/atlas_gpu
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONUNBUFFERED=1

verify() {  # verify FILE SHA256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || { echo "device.sh: $1 has sha256 $got, expected $2" >&2; exit 3; }
}

manifest_get() {  # manifest_get MANIFEST PYTHON_EXPRESSION_OF_m
  python3 -c "import json, sys; m = json.load(open(sys.argv[1])); print($2)" "$1"
}

case "${1:-}" in
stash)
  mkdir -p "$STASH/parts"
  M=.gpu_carry/a/manifest.json
  verify .gpu_carry/a/gguf.part1 "$(manifest_get $M "m['parts'][0]['sha256']")"
  cp .gpu_carry/a/gguf.part1 "$STASH/parts/" && cp $M "$STASH/parts/manifest_a.json"
  echo "device.sh: stashed gguf.part1 ($(stat -c %s "$STASH/parts/gguf.part1") bytes, sha256 verified) in $STASH/parts"
  ;;
run)
  shift
  OUT_DIR=${OUT:-$STASH/export}
  mkdir -p "$OUT_DIR" "$STASH"
  {
    echo "device.sh run: $(date -u +%FT%TZ) commit $(git rev-parse HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    M=.gpu_carry/b/manifest.json
    python3 experiments/gpu/pack.py join --manifest $M --parts "$STASH/parts" .gpu_carry/a .gpu_carry/b \
      --out "$STASH/model/$GGUF" || exit 3
    verify .gpu_carry/b/site.tar.xz "$(manifest_get $M "m['site']['sha256']")"
    mkdir -p /tmp/site && tar -xJf .gpu_carry/b/site.tar.xz -C /tmp/site || exit 4
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
    verify .gpu_carry/b/data.tar.xz "$(manifest_get $M "m['data']['sha256']")"
    mkdir -p "$STASH/data" && tar -xJf .gpu_carry/b/data.tar.xz -C "$STASH/data" || exit 5
    BUDGET=$(( ${CALL_S:-600} - SECONDS - 30 ))
    echo "device.sh: ready after ${SECONDS} s; run.py gets ${BUDGET} s"
    python3 experiments/gpu/run.py --out "$STASH/run" --export "$OUT_DIR" --data-root "$STASH/data" \
      --model-dir "$STASH/model" --budget "$BUDGET" "$@"
  } 2>&1 | tee "$OUT_DIR/console.txt"
  exit "${PIPESTATUS[0]}"
  ;;
*)
  echo "usage: bash experiments/gpu/device.sh stash | run [run.py arguments]" >&2
  exit 2
  ;;
esac
