#!/usr/bin/env bash
# FT pipeline vs prompt-token disaggregation with the same number of workers, on one prompt-heavy
# trace, one after the other: `dejavu serve` + `dejavu bench serve` for each.
#   MODEL=random:opt-1.3b DEVICE=cuda OUT=/tmp/out bash benchmarks/disagg_vs_pipeline.sh
# DEPLOYS="pipeline_sync pipeline" runs only the FT pipeline (DEJAVU_PIPE_SYNC=1 in the environment: its hidden
# states sent synchronously, as before the asynchronous pipes, for a baseline in the same command).
# DEPLOYS="disagg_normal disagg": disaggregated with the prompt worker's CUDA IPC copies on a stream of
# normal priority (DEJAVU_KV_STREAM_PRIORITY=normal), then of high priority (the default).
set -euo pipefail
MODEL=${MODEL:-random:opt-125m}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-/tmp}
PORT=${PORT:-8124}
N=${N:-24}
RATE=${RATE:-4}
PY=${PY:-python3}
mkdir -p "$OUT"
$PY -c "import json; json.dump([[${PROMPT:-384}, 8]] * 16 + [[32, 48]] * 8, open('$OUT/prompt_heavy.json', 'w'))"
run() {
  local name=$1; shift
  $PY -m dejavu serve --model "$MODEL" --device "$DEVICE" --port "$PORT" "$@" > "$OUT/serve_$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 180); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
  echo "== $name ($*)"
  $PY -m dejavu bench serve --url "http://127.0.0.1:$PORT" --trace "$OUT/prompt_heavy.json" --num-requests "$N" \
    --rate "$RATE" --json "$OUT/bench_$name.json" 2>/dev/null
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E 'kind="prompt_to_token"|transfer_seconds_total\{' || true
  kill -TERM "$pid"; wait "$pid" || true
}
for d in ${DEPLOYS:-pipeline disagg}; do
  case $d in
    pipeline) run pipeline --pp 2 ;;
    pipeline_sync) DEJAVU_PIPE_SYNC=1 run pipeline_sync --pp 2 ;;
    disagg) run disagg --prompt-stages 1 --token-stages 1 ;;
    disagg_normal) DEJAVU_KV_STREAM_PRIORITY=normal run disagg_normal --prompt-stages 1 --token-stages 1 ;;
  esac
done
