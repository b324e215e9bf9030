#!/usr/bin/env bash
# The simulator against the real system on this machine (CPU processes): profile the model for a
# 2-worker deployment, simulate FT pp=2 and disaggregated 1P+1T on a trace, run both for real with
# `dejavu serve` + `dejavu bench serve` on the same trace, print the ratios.
# Usage: benchmarks/validate_simulator.sh [OUTDIR]   (about 3 minutes on a 2-core VM)
set -euo pipefail
OUT=${1:-/tmp/dejavu-validate}
MODEL=${MODEL:-random:opt-125m}
N=${N:-24}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
python3 - "$OUT/trace.json" "$N" <<'PY'
import json, random, sys
rng = random.Random(0)
json.dump([[rng.choice([32, 64, 96, 128]), rng.choice([16, 24, 32])] for _ in range(int(sys.argv[2]))],
          open(sys.argv[1], "w"))
PY
dejavu profile --model "$MODEL" --workers 2 ${OVERHEAD_VIA:+--overhead-via $OVERHEAD_VIA} --batches 1,4,8 --prompt-lens 32,64,128 --contexts 32,96,160 \
  --json "$OUT/profile.json"
dejavu simulate --profile "$OUT/profile.json" --trace "$OUT/trace.json" --microbatch 4 \
  --deploy ft:2 --deploy disagg:1+1 --json "$OUT/sim.json"
port=18430
for dep in "ft:2|--pp 2" "disagg:1+1|--prompt-stages 1 --token-stages 1"; do
  name=${dep%%|*}; flags=${dep#*|}; port=$((port + 1))
  dejavu serve --model "$MODEL" $flags --microbatch-size 4 --port $port > "$OUT/serve-${name/:/_}.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
  dejavu bench serve --url "http://127.0.0.1:$port" --trace "$OUT/trace.json" --num-requests "$N" \
    --json "$OUT/real-${name/:/_}.json" > /dev/null 2>&1
  kill $pid; wait $pid || true   # the next deployment gets its own port
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
sim = {r["deployment"]: r for r in json.load(open(f"{out}/sim.json"))["results"]}
print(f"{'deployment':<12} {'real tok/s':>10} {'sim tok/s':>10} {'sim/real':>9}")
for name in ("ft:2", "disagg:1+1"):
    real = json.load(open(f"{out}/real-{name.replace(':', '_')}.json"))
    r = real["throughput_output_tokens_per_s"]
    s = sim[name]["tokens_per_s"]
    print(f"{name:<12} {r:>10.1f} {s:>10.1f} {s / r:>8.2f}x")
PY
