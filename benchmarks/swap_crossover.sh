#!/usr/bin/env bash
# Microbatch swapping across context lengths (the paper's Appendix G crossover): for each prompt
# length, `dejavu bench swap` without and with swapping at a KV budget that holds SEQS full-length
# sequences per worker without swapping (so swapping should hold D/k times as many). Short contexts:
# the swap-in of a microbatch hides behind the step before it; long ones: PCIe time per step exceeds
# compute and the wait shows. Logs and JSON under $OUT, a table at the end.
#   OUT=/tmp/swapx DEVICE=cuda MODEL=random:opt-1.3b bash benchmarks/swap_crossover.sh
# Knobs: PROMPTS ("32 256 1024"), OUTPUT (96), SEQS (16), REQUESTS (64), PP (4), RESIDENT (2),
# ADMISSION (reserve: a fixed batch per budget, no preemption; or greedy), PY.
set -uo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-random:opt-125m}
OUT=${OUT:-/tmp/swapx}
PROMPTS=${PROMPTS:-"32 256 1024"}
OUTPUT=${OUTPUT:-96}
SEQS=${SEQS:-16}
REQUESTS=${REQUESTS:-64}
PP=${PP:-4}
RESIDENT=${RESIDENT:-2}
ADMISSION=${ADMISSION:-reserve}
mkdir -p "$OUT"
for p in $PROMPTS; do
  blocks=$(( SEQS * ((p + OUTPUT + 15) / 16) ))
  echo "[$(date +%T)] prompt $p + $OUTPUT tokens, $blocks KV blocks per worker"
  $PY -m dejavu bench swap --device "$DEVICE" --model "$MODEL" --pp "$PP" --resident-microbatches "$RESIDENT" \
    --kv-cache-blocks "$blocks" --requests "$REQUESTS" --prompt-len "$p" --max-tokens "$OUTPUT" \
    --admission "$ADMISSION" --json "$OUT/swap_p$p.json" > "$OUT/swap_p$p.log" 2>&1 || { echo "failed:"; tail -5 "$OUT/swap_p$p.log"; }
done
$PY - "$OUT" $PROMPTS <<'PYEOF'
import json, os, sys
out = sys.argv[1]
print("| prompt + output | KV blocks / worker | microbatch off / on | peak seqs off / on | tok/s off / on | on / off "
      "| swap-in wait (on) | swap-in GB | preemptions off / on | same tokens |")
print("|---|---|---|---|---|---|---|---|---|---|")
for p in sys.argv[2:]:
    path = os.path.join(out, f"swap_p{p}.json")
    if not os.path.exists(path):
        print(f"| {p} | (failed) |"); continue
    r = json.load(open(path)); off, on = r["rows"]
    print(f"| {p} + {r['max_tokens']} | {r['kv_blocks']} | {off['microbatch_size']} / {on['microbatch_size']} | "
          f"{off['peak_running']} / {on['peak_running']} | "
          f"{off['tokens_per_s']:.1f} / {on['tokens_per_s']:.1f} | {on['tokens_per_s'] / off['tokens_per_s']:.2f}x | "
          f"{100 * on['swap_wait_fraction']:.1f}% | {on['swap_in_bytes'] / 1e9:.2f} | "
          f"{off['preemptions']} / {on['preemptions']} | {r['same_tokens']} |")
PYEOF
