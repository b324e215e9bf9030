#!/usr/bin/env bash
# The official `openai` client against `dejavu serve`: every sampling field vLLM users send, logprobs,
# n (streamed), echo, /tokenize, /detokenize, /version and the vLLM-named metrics.
#   pip install openai            (not a dejavu dependency)
#   examples/real_clients.sh [MODEL] [PORT]      e.g. examples/real_clients.sh smollm2 8000
# With a pipeline: SERVE_ARGS="--pp 2" examples/real_clients.sh
set -euo pipefail
MODEL=${1:-random:llama-tiny}
PORT=${2:-8000}
BASE=http://127.0.0.1:$PORT

. "$(dirname "$0")/serve_background.sh"
serve_background python "${LOG:-/tmp/dejavu_real_clients_serve.log}" "$PORT" --model "$MODEL" ${SERVE_ARGS:-}

MODEL="$MODEL" BASE="$BASE" python - <<'PY'
import json, os, urllib.request

import openai

model, base = os.environ["MODEL"], os.environ["BASE"]
c = openai.OpenAI(base_url=base + "/v1", api_key=os.environ.get("DEJAVU_API_KEY", "none"))
r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0.8, seed=1,
                         n=2, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2,
                         logit_bias={"0": -100}, extra_body={"repetition_penalty": 1.1, "min_p": 0.05})
for ch in r.choices:
    print(f"choice {ch.index}: {ch.text!r}  logprobs {[round(x, 2) for x in ch.logprobs.token_logprobs]}")
texts = {}
for chunk in c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, n=2, seed=3, stream=True):
    for ch in chunk.choices:
        texts[ch.index] = texts.get(ch.index, "") + ch.text
print("streamed n=2:", texts)
chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                 logprobs=True, top_logprobs=2)
print("chat:", repr(chat.choices[0].message.content), [t.token for t in chat.choices[0].logprobs.content])
print("echo:", repr(c.completions.create(model=model, prompt="Echo", max_tokens=4, echo=True).choices[0].text))
print("model:", c.models.retrieve(model).model_extra)


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())


ids = post("/tokenize", {"prompt": "héllo 🎉"})
print("tokenize:", ids, "detokenize:", post("/detokenize", {"tokens": ids["tokens"]}))
print("version:", json.loads(urllib.request.urlopen(base + "/version").read()))
metrics = urllib.request.urlopen(base + "/metrics").read().decode()
print("\n".join(line for line in metrics.splitlines() if line.startswith("dejavu:generation_tokens_total")))
PY
