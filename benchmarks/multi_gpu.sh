#!/usr/bin/env bash
# Issue 11's runs on one host with several GPUs (one worker process per GPU unless a run says
# otherwise); every log and JSON goes under $OUT.
#   1  DéjàVuLib GPU -> GPU over NCCL (scattered blocks, pipelined) vs a raw NCCL send of the same bytes
#   2  FT pipeline pp=G vs disaggregation with the planner's split, prompt-heavy and chat-like traces
#   3  microbatch swapping at a fixed KV budget, with and without (and an fp32 token-equality check)
#   4  failover: kill -9 one GPU worker mid-run, replication on and off
#   5  planner check: the planner's pick against every split measured on the prompt-heavy trace
#   OUT=/tmp/mgpu RUNS="1 2 5" bash benchmarks/multi_gpu.sh
# Knobs: GPUS (default: all), MODEL (run 2/5), FT_MODEL (run 3/4), N, MB, KV_BLOCKS, PY, DEVICE,
# PROFILE (a profile.json measured earlier), OVERHEAD_VIA (how the profile measures the step overhead:
# http, the default, through a server and `dejavu bench serve` as the runs below; or engine).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of the script's logic on CPU processes (set GPUS=2)
OUT=${OUT:-/tmp/mgpu}
RUNS=${RUNS:-"1 2 3 4 5"}
GPUS=${GPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
MODEL=${MODEL:-random:opt-6.7b}
FT_MODEL=${FT_MODEL:-random:opt-1.3b}
N=${N:-48}
MB=${MB:-16}
KV_BLOCKS=${KV_BLOCKS:-6144}
PORT=${PORT:-8131}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.log"; }
if [ "$GPUS" -lt 2 ]; then echo "multi_gpu.sh needs at least 2 GPUs (found $GPUS)"; exit 2; fi
log "GPUs: $GPUS; runs: $RUNS; model $MODEL"
nvidia-smi topo -m > "$OUT/topology.txt" 2>&1 || true

serve() {  # serve NAME FLAGS...: start a deployment, wait until healthy
  local name=$1; shift
  $PY -m dejavu serve --model "$MODEL" --device "$DEVICE" --port "$PORT" --kv-cache-blocks "$KV_BLOCKS" \
    --microbatch-size "$MB" "$@" > "$OUT/serve_$name.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && return 0
    kill -0 $SERVE_PID 2> /dev/null || { log "serve $name exited early"; tail -5 "$OUT/serve_$name.log"; return 1; }
    sleep 1
  done
  log "serve $name not healthy after 300 s"; return 1
}
stop() { kill -TERM "$SERVE_PID" 2> /dev/null; wait "$SERVE_PID" 2> /dev/null; }
flags_of() {  # ft:4 -> --pp 4 ; disagg:1+3 -> --prompt-stages 1 --token-stages 3
  case $1 in
    ft:*) echo "--pp ${1#ft:}" ;;
    ftnccl:*) echo "--pp ${1#ftnccl:} --recovery off" ;;  # no fault tolerance: activations over NCCL p2p
    disagg:*) local s=${1#disagg:}; echo "--prompt-stages ${s%+*} --token-stages ${s#*+}" ;;
  esac
}
bench() {  # bench DEPLOYMENT TRACE-NAME
  local dep=$1 tr=$2 src
  if [ "$tr" = chat ]; then src=(--synthetic --max-prompt 1024 --max-output 256); else src=(--trace "$OUT/trace_$tr.json"); fi
  $PY -m dejavu bench serve --url "http://127.0.0.1:$PORT" "${src[@]}" --num-requests "$N" --seed 1 \
    --json "$OUT/bench_${dep//[:+]/_}_$tr.json" > "$OUT/bench_${dep//[:+]/_}_$tr.log" 2>&1 \
    || { log "bench $dep $tr failed"; tail -5 "$OUT/bench_${dep//[:+]/_}_$tr.log"; return 1; }
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E 'kv_transfer_seconds_total|kv_bytes_total' \
    > "$OUT/metrics_${dep//[:+]/_}_$tr.txt" || true
  log "$dep $tr: $($PY -c "import json; d=json.load(open('$OUT/bench_${dep//[:+]/_}_$tr.json')); \
print(f\"{d['throughput_output_tokens_per_s']:.1f} tok/s, {d['completed']} completed, {d['failed']} failed\")")"
}

# ---------------------------------------------------------------- 1: NCCL KV streaming
if [[ " $RUNS " == *" 1 "* ]]; then
  log "run 1: DéjàVuLib GPU -> GPU over NCCL vs raw NCCL"
  for prio in "" --high-priority-nccl; do
    $PY -m dejavu bench kvpeer --device "$DEVICE" --piece-mib 32,128 $prio --json "$OUT/kvpeer${prio:+_hp}.json" 2>&1 \
      | grep -v Warning | tee "$OUT/run1_kvpeer${prio:+_hp}.log" | tail -6
  done
fi

# ---------------------------------------------------------------- 2 + 5: disaggregation and the planner
if [[ " $RUNS " == *" 2 "* || " $RUNS " == *" 5 "* ]]; then
  $PY - "$OUT" "$N" <<'EOF'
import json, random, sys
out, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
json.dump([[rng.randint(768, 1536), rng.randint(16, 48)] for _ in range(n)], open(f"{out}/trace_prompt.json", "w"))
EOF
  read -r PLEN OLEN < <($PY -c "import json; t=json.load(open('$OUT/trace_prompt.json')); \
print(sum(p for p, _ in t) // len(t), sum(o for _, o in t) // len(t))")
  log "profile $MODEL on one GPU; plan for $GPUS GPUs (prompt $PLEN, output $OLEN, microbatch $MB)"
  if [ -n "${PROFILE:-}" ]; then
    cp "$PROFILE" "$OUT/profile.json"  # a profile measured earlier on the same kind of GPU
  else
    $PY -m dejavu profile --model "$MODEL" --device "$DEVICE" --batches 1,8,16 --prompt-lens 256,1024,1536 \
      --contexts 256,1024,1536 --memory-gib 140 --overhead-via "${OVERHEAD_VIA:-http}" --json "$OUT/profile.json" > "$OUT/profile.log" 2>&1 \
      || { log "profile failed"; tail -5 "$OUT/profile.log"; }
  fi
  $PY -m dejavu plan --profile "$OUT/profile.json" --machines "$GPUS" --microbatch "$MB" --prompt-len "$PLEN" \
    --output-len "$OLEN" --json "$OUT/plan.json" 2>&1 | tee "$OUT/plan.log"
  CHOICE=$($PY -c "import json; print(json.load(open('$OUT/plan.json'))['choice'])")
  BEST_DISAGG=$($PY -c "import json; c=[x for x in json.load(open('$OUT/plan.json'))['candidates'] \
if x['deployment'].startswith('disagg')]; \
print(max(c, key=lambda x: x.get('simulated_tokens_per_s') or x['closed_form_tokens_per_s'])['deployment'])")
  DEPS="ft:$GPUS ftnccl:$GPUS $BEST_DISAGG"
  [[ " $RUNS " == *" 5 "* ]] && DEPS="$($PY -c "import json; print(' '.join(c['deployment'] for c in \
json.load(open('$OUT/plan.json'))['candidates']))") ftnccl:$GPUS"
  log "planner's choice: $CHOICE; best disaggregated split: $BEST_DISAGG; measuring: $DEPS"
  for dep in $DEPS; do
    # shellcheck disable=SC2046
    serve "${dep//[:+]/_}" $(flags_of "$dep") || continue
    bench "$dep" prompt
    if [ "$dep" != "${dep#ft}" ] || [ "$dep" = "$BEST_DISAGG" ]; then bench "$dep" chat; fi
    stop
  done
  $PY - "$OUT" "$CHOICE" "ft:$GPUS" "$BEST_DISAGG" "ftnccl:$GPUS" <<'EOF' | tee -a "$OUT/summary.log"
import glob, json, os, sys
out, choice, ft0, dis, ftn = sys.argv[1:6]
tps = {}
for f in glob.glob(f"{out}/bench_*_prompt.json"):
    dep = os.path.basename(f)[len("bench_"):-len("_prompt.json")]
    if dep.startswith("ftnccl"):
        continue  # not a planner candidate (no fault tolerance)
    dep = dep.replace("_", ":", 1).replace("_", "+")
    d = json.load(open(f))
    if d["failed"] == 0:  # a run with failed requests measures nothing
        tps[dep] = d["throughput_output_tokens_per_s"]
for ft in (ft0, ftn):
  for tr in ("prompt", "chat"):
    try:
        da = json.load(open(f"{out}/bench_{ft.replace(':', '_')}_{tr}.json"))
        db = json.load(open(f"{out}/bench_{dis.replace(':', '_').replace('+', '_')}_{tr}.json"))
        if da["failed"] or db["failed"]:
            print(f"run 2, {tr} trace: requests failed ({ft} {da['failed']}, {dis} {db['failed']}): no comparison")
            continue
        a, b = da["throughput_output_tokens_per_s"], db["throughput_output_tokens_per_s"]
        print(f"run 2, {tr} trace: {ft} {a:.1f} tok/s, {dis} {b:.1f} tok/s -> {b / a:.2f}x")
    except FileNotFoundError:
        print(f"run 2, {tr} trace: a deployment did not finish")
if tps:
    best = max(tps, key=tps.get)
    got = tps.get(choice)
    print("run 5: measured " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(tps.items())) +
          f"; planner chose {choice} ({got if got is None else round(got, 1)} tok/s), best measured {best}"
          + (f" -> {got / tps[best]:.3f} of the best" if got else ""))
EOF
fi

# ---------------------------------------------------------------- 3: swapping
if [[ " $RUNS " == *" 3 "* ]]; then
  log "run 3: swapping ($FT_MODEL), fp32 token check first"
  $PY -m dejavu bench swap --device cuda --dtype float32 --model random:opt-125m --pp 2 --resident-microbatches 1 \
    --kv-cache-blocks 64 --requests 16 --prompt-len 64 --max-tokens 16 --json "$OUT/swap_fp32_check.json" \
    > "$OUT/swap_fp32_check.log" 2>&1; log "fp32 check: $(grep 'same tokens' "$OUT/swap_fp32_check.log")"
  for cfg in "2 1" "4 2"; do
    set -- $cfg
    $PY -m dejavu bench swap --device cuda --model "$FT_MODEL" --pp "$1" --resident-microbatches "$2" \
      --kv-cache-blocks 256 --requests 64 --prompt-len 256 --max-tokens 64 --json "$OUT/swap_pp$1.json" \
      > "$OUT/swap_pp$1.log" 2>&1
    log "swap pp=$1 resident $2:"; tail -4 "$OUT/swap_pp$1.log" | tee -a "$OUT/summary.log"
  done
fi

# ---------------------------------------------------------------- 4: failover
if [[ " $RUNS " == *" 4 "* ]]; then
  log "run 4: failover ($FT_MODEL, pp=$GPUS, one worker per GPU)"
  MODEL=$FT_MODEL DEVICE=$DEVICE N=16 PROMPT=128 OUTPUT=320 KILL_AT=${KILL_AT:-3} DEPLOY="--pp $GPUS" OUT="$OUT" PORT=$((PORT + 1)) \
    PY=$PY bash "$(dirname "$0")/failover.sh" > "$OUT/run4_failover.log" 2>&1
  grep -E "^==|in flight|recovery|recomputed" "$OUT/run4_failover.log" | tee -a "$OUT/summary.log"
fi
log "done"
