#!/usr/bin/env bash
# lm-eval-harness and guidellm (when installed) unmodified against `dejavu serve`: lm-eval's
# `local-completions` model runs a loglikelihood task (multiple choice: echo + logprobs over
# token-id prompts, in batches) and a generate_until task (lists of prompts with stop strings), each
# on a small local JSONL dataset. lm-eval finds the server's tokenizer through /tokenizer_info,
# /tokenize and /detokenize (its remote tokenizer backend), so no HF tokenizer download is needed.
#   pip install 'lm-eval[api]' [guidellm]      (not dejavu dependencies)
#   MODEL=smollm2 OUT=/tmp/rc bash benchmarks/real_clients.sh
set -euo pipefail
MODEL=${MODEL:-smollm2}
PORT=${PORT:-8131}
OUT=${OUT:-/tmp/dejavu_real_clients}
BATCH=${BATCH:-4}
PY=${PY:-python3}
BASE=http://127.0.0.1:$PORT
mkdir -p "$OUT/tasks"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

cat > "$OUT/tasks/mc.jsonl" <<'EOF'
{"question": "The capital of France is", "choices": [" Paris", " Berlin", " Tokyo"], "answer": 0}
{"question": "Two plus two equals", "choices": [" seven", " four", " ten"], "answer": 1}
{"question": "Water freezes at zero degrees", "choices": [" Fahrenheit", " Kelvin", " Celsius"], "answer": 2}
{"question": "The opposite of hot is", "choices": [" cold", " loud", " green"], "answer": 0}
{"question": "A week has seven", "choices": [" hours", " days", " years"], "answer": 1}
{"question": "The sun rises in the", "choices": [" north", " west", " east"], "answer": 2}
EOF
cat > "$OUT/tasks/gen.jsonl" <<'EOF'
{"question": "What is the capital of France?", "answer": "Paris"}
{"question": "What color is the sky on a clear day?", "answer": "Blue"}
{"question": "How many legs does a spider have?", "answer": "Eight"}
{"question": "What is the largest planet in the solar system?", "answer": "Jupiter"}
EOF
cat > "$OUT/tasks/dejavu_mc.yaml" <<EOF
task: dejavu_mc
dataset_path: json
dataset_kwargs: {data_files: {test: $OUT/tasks/mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list: [{metric: acc}]
EOF
cat > "$OUT/tasks/dejavu_gen.yaml" <<EOF
task: dejavu_gen
dataset_path: json
dataset_kwargs: {data_files: {test: $OUT/tasks/gen.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "Question: What is the capital of Italy?\nAnswer: Rome\n\nQuestion: {{question}}\nAnswer:"
doc_to_target: answer
generation_kwargs: {until: ["\n", "."], max_gen_toks: 12}
metric_list: [{metric: exact_match, ignore_case: true, ignore_punctuation: true, regexes_to_ignore: [" "]}]
EOF

. "$(dirname "$0")/../examples/serve_background.sh"
serve_background "$PY" "$OUT/serve.log" "$PORT" --model "$MODEL" ${SERVE_ARGS:-}

for task in dejavu_mc dejavu_gen; do
    start=$(date +%s)
    $PY -m lm_eval --model local-completions --tasks "$task" --include_path "$OUT/tasks" --batch_size "$BATCH" \
        --model_args "model=$MODEL,base_url=$BASE/v1/completions,num_concurrent=1,max_retries=1,tokenized_requests=True" \
        --output_path "$OUT/lm_eval_$task" > "$OUT/lm_eval_$task.log" 2>&1 \
        || { tail -5 "$OUT/lm_eval_$task.log" >&2; exit 1; }
    grep -E '^\|' "$OUT/lm_eval_$task.log"
    echo "== lm-eval $task: $(( $(date +%s) - start )) s (log: $OUT/lm_eval_$task.log)"
done

# guidellm: synthetic prompts of a fixed token length (no dataset download), cut to size with the
# served model's own tokenizer, saved to a local directory (guidellm loads it with AutoTokenizer).
if $PY -c "import guidellm" 2>/dev/null; then
    $PY -c "import sys; from dejavu.models.loader import load_tokenizer, resolve
load_tokenizer(resolve(sys.argv[1])).tok.save_pretrained(sys.argv[2])" "$MODEL" "$OUT/tokenizer"
    start=$(date +%s)
    $PY -m guidellm run --backend "kind=openai_http,target=$BASE,model=$MODEL,request_format=/v1/completions" \
        --profile kind=synchronous --constraint kind=max_requests,count="${GUIDELLM_REQUESTS:-8}" \
        --tokenizer "kind=huggingface_auto,model=$OUT/tokenizer" \
        --data kind=synthetic_text,prompt_tokens=64,output_tokens=32 \
        --output "kind=json,path=$OUT/guidellm.json" --disable-console-interactive > "$OUT/guidellm.log" 2>&1 \
        || { tail -20 "$OUT/guidellm.log" >&2; exit 1; }
    tail -25 "$OUT/guidellm.log"
    echo "== guidellm: $(( $(date +%s) - start )) s (report: $OUT/guidellm.json)"
else
    echo "== guidellm not installed: skipped (pip install guidellm)"
fi
