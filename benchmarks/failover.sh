#!/usr/bin/env bash
# Failover: kill -9 one worker in the middle of a load.
# For each setting in RUNS one `dejavu serve` and one `dejavu bench serve --kill-worker`, which runs
# the same load twice (failure-free first: the baseline) and reports the latency inflation of the
# requests in flight at the kill and kill -> first resumed token split into detection, replacement
# (weights), KV fetch, the rest of the recovery and the first token. Settings:
#   replicated  --replicate (warm spare holding both stages' weights in pinned host memory)
#   device      --replicate --standby-weights device (the spare holds them in device memory)
#   cold        --replicate --standby-weights off (the spare loads the checkpoint at takeover)
#   restart     no replicas: requests start over from their prompts
#   MODEL=random:opt-1.3b DEVICE=cuda OUT=/tmp/out RUNS="replicated cold" bash benchmarks/failover.sh
set -euo pipefail
MODEL=${MODEL:-random:opt-125m}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-/tmp}
PORT=${PORT:-8125}
N=${N:-24}
RATE=${RATE:-inf}
KILL=${KILL:-stage:1}
KILL_AT=${KILL_AT:-3}
DEPLOY=${DEPLOY:---pp 2}
RUNS=${RUNS:-replicated restart}
PY=${PY:-python3}
mkdir -p "$OUT"
$PY -c "import json; json.dump([[${PROMPT:-64}, ${OUTPUT:-128}]] * $N, open('$OUT/failover_trace.json', 'w'))"
run() {
  local name=$1; shift
  # shellcheck disable=SC2086
  # No prefix caching: the failure pass repeats the baseline's prompts, and its hits would shorten it.
  $PY -m dejavu serve --model "$MODEL" --device "$DEVICE" --port "$PORT" --no-enable-prefix-caching $DEPLOY "$@" \
    > "$OUT/serve_$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
  echo "== $name ($DEPLOY $*)"
  $PY -m dejavu bench serve --url "http://127.0.0.1:$PORT" --trace "$OUT/failover_trace.json" --num-requests "$N" \
    --rate "$RATE" --kill-worker "$KILL" --kill-at "$KILL_AT" --json "$OUT/failover_$name.json"
  kill -TERM "$pid"; wait "$pid" || true
}
for name in $RUNS; do
  case $name in
    replicated) run replicated --replicate ;;
    device) run device --replicate --standby-weights device ;;
    cold) run cold --replicate --standby-weights off ;;
    restart) run restart ;;
    *) echo "unknown setting $name (replicated, device, cold, restart)" >&2; exit 2 ;;
  esac
done
