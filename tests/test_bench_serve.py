"""`dejavu bench serve` against a live server: vLLM's metric names and per-request arrays, each
workload, the chat backend, goodput, --max-concurrency, and clear errors for bad input."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dejavu import LLM
from dejavu.bench.serve_data import client_tokenizer, load_sharegpt, random_requests
from dejavu.cli import main
from dejavu.serving.api import ApiServer

MODEL = "random:llama-tiny"
METRICS = ("ttft", "tpot", "itl", "e2el")


@pytest.fixture(scope="module")
def url():
    llm = LLM(device="cpu", model=MODEL, block_size=4, kv_cache_blocks=1024, max_model_len=512)
    srv = ApiServer(llm, MODEL)
    port = srv.start_background()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


def bench(url, tmp_path, *args):
    out = tmp_path / "r.json"
    rc = main(["bench", "serve", "--url", url, "--json", str(out), "--disable-tqdm", *args])
    assert rc == 0
    return json.loads(out.read_text())


def tpots(r):
    return [(e - t) / (o - 1) for e, t, o in zip(r["e2els"], r["ttfts"], r["output_lens"]) if o > 1]


def test_random_reports_vllm_metrics_and_saves_them(url, tmp_path, capsys):
    r = bench(url, tmp_path, "--dataset-name", "random", "--num-requests", "6", "--random-input-len", "24",
              "--random-output-len", "6", "--random-range-ratio", "0.5", "--rate", "50",
              "--goodput", "ttft:150", "tpot:40", "--save-result", "--result-dir", str(tmp_path / "res"))
    text = capsys.readouterr().out
    for label in ("Request throughput (req/s):", "Request goodput (req/s):", "Output token throughput (tok/s):",
                  "Total Token throughput (tok/s):", "Mean TPOT (ms):", "Median ITL (ms):", "P99 E2EL (ms):"):
        assert label in text
    for m in METRICS:
        for stat in ("mean", "median", "std", "p95", "p99"):
            assert r[f"{stat}_{m}_ms"] is not None and r[f"{stat}_{m}_ms"] >= 0
        assert r[f"median_{m}_ms"] <= r[f"p99_{m}_ms"]
    assert r["completed"] == 6 and r["failed"] == 0 and r["num_prompts"] == 6
    # One entry per request; lengths within the range ratio, outputs exact (ignore_eos), and the
    # server's prompt token counts equal the token ids sent.
    for key in ("input_lens", "output_lens", "ttfts", "itls", "e2els", "errors"):
        assert len(r[key]) == 6
    assert all(12 <= n <= 36 for n in r["input_lens"]) and all(3 <= n <= 9 for n in r["output_lens"])
    assert r["errors"] == [""] * 6 and r["total_output_tokens"] == sum(r["output_lens"])
    assert r["total_input_tokens"] == sum(r["input_lens"])
    # TPOT from the arrays, as vLLM defines it; ITL samples between streamed tokens.
    tp = sorted(tpots(r))
    assert r["mean_tpot_ms"] > 0 and abs(r["mean_tpot_ms"] - 1000 * sum(tp) / len(tp)) < 1e-6
    assert all(len(itl) == n - 1 for itl, n in zip(r["itls"], r["output_lens"]))
    assert abs(r["output_throughput"] - r["total_output_tokens"] / r["duration"]) < 1e-9
    assert r["total_token_throughput"] > r["output_throughput"] and r["request_throughput"] > 0
    # Goodput: the requests meeting both SLOs, per second.
    good = sum(t * 1000 <= 150 and (o <= 1 or (e - t) / (o - 1) * 1000 <= 40)
               for t, e, o in zip(r["ttfts"], r["e2els"], r["output_lens"]))
    assert r["request_goodput"] <= r["request_throughput"]
    assert abs(r["request_goodput"] - good / r["duration"]) < 1e-9
    # --save-result writes the same report under vLLM's file name.
    (saved,) = os.listdir(tmp_path / "res")
    assert saved.startswith("openai-50.0qps-random-llama-tiny-") and saved.endswith(".json")
    assert json.loads((tmp_path / "res" / saved).read_text()) == r
    # Our own report stays alongside.
    assert r["normalized_latency_s_per_token"]["p50"] > 0 and r["throughput_output_tokens_per_s"] > 0


def test_prefix_dataset_and_max_concurrency(url, tmp_path):
    reqs = random_requests(5, 0, 8, 4, prefix_len=20)
    assert all(q.prompt[:20] == reqs[0].prompt[:20] and q.prompt_len == 28 == len(q.prompt) for q in reqs)
    assert len({tuple(q.prompt[20:]) for q in reqs}) == 5
    r = bench(url, tmp_path, "--dataset-name", "prefix", "--prefix-len", "40", "--num-requests", "8",
              "--random-input-len", "8", "--random-output-len", "6", "--max-concurrency", "2")
    assert r["completed"] == 8 and r["input_lens"] == [48] * 8 and r["max_concurrency"] == 2
    # All 8 arrive at once (rate inf): exactly 2 in flight at any time, by the requests' timestamps.
    spans = sorted(zip(r["start_times"], r["end_times"]))
    in_flight = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert in_flight == 2 == r["peak_concurrency"]


def test_prefix_fraction(url, tmp_path):
    """--prefix-fraction 0.75: 3 of 4 requests start with the shared prefix, the others with as many
    tokens of their own; bad fractions are refused by name."""
    reqs = random_requests(8, 1, 5, 3, prefix_len=12, prefix_fraction=0.75)
    heads = [tuple(q.prompt[:12]) for q in reqs]
    common = max(set(heads), key=heads.count)
    assert heads.count(common) == 6 and len(set(heads)) == 3
    assert all(len(q.prompt) == q.prompt_len == 17 for q in reqs)
    assert random_requests(4, 1, 5, 3, prefix_len=12, prefix_fraction=1.0) == random_requests(4, 1, 5, 3, prefix_len=12)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--prefix-fraction"):
            random_requests(4, 1, 5, 3, prefix_len=12, prefix_fraction=bad)
    r = bench(url, tmp_path, "--dataset-name", "prefix", "--prefix-len", "16", "--prefix-fraction", "0.5",
              "--num-requests", "4", "--random-input-len", "4", "--random-output-len", "2")
    assert r["completed"] == 4 and r["input_lens"] == [20] * 4


def test_sharegpt_dataset(url, tmp_path):
    human = ["Tell me about the history of Rome in a few short sentences please.",
             "What is two plus two, and can you explain why it is so?"]
    gpt = ["Rome grew from a small town on the Tiber into an empire that ruled the Mediterranean.",
           "Two plus two is four: adding two units to two units gives four units."]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": human[0]}, {"from": "gpt", "value": gpt[0]}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": human[1]},
                           {"from": "gpt", "value": gpt[1]}]},
        {"conversations": [{"from": "human", "value": "a question nobody answered"}]},
        {"id": "no conversations"}]))
    assert load_sharegpt(str(path)) == list(zip(human, gpt))
    r = bench(url, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-requests", "2",
              "--ignore-eos")
    tok = client_tokenizer(MODEL)
    assert r["completed"] == 2 and r["dataset_name"] == "sharegpt" and r["tokenizer_id"] == MODEL
    pairs = sorted(zip(r["input_lens"], r["output_lens"]))
    assert pairs == sorted((len(tok.encode(h)), len(tok.encode(g))) for h, g in zip(human, gpt))


def test_chat_backend(url, tmp_path):
    r = bench(url, tmp_path, "--backend", "openai-chat", "--dataset-name", "random", "--num-requests", "3",
              "--random-input-len", "10", "--random-output-len", "5")
    assert r["backend"] == "openai-chat" and r["completed"] == 3 and r["output_lens"] == [5] * 3
    # The server counts the chat template's tokens too.
    assert all(n > 10 for n in r["input_lens"]) and r["mean_tpot_ms"] > 0
    assert all(1 <= len(itl) <= 4 for itl in r["itls"]) and min(r["ttfts"]) > 0


def test_bad_input_gives_clear_errors(url, tmp_path, capsys):
    def error(*args):
        assert main(["bench", "serve", "--url", url, "--disable-tqdm", *args]) == 2
        return capsys.readouterr().err

    shape = tmp_path / "shape.json"
    shape.write_text('{"conversations": []}')
    assert "must be a JSON list" in error("--dataset-name", "sharegpt", "--dataset-path", str(shape))
    empty = tmp_path / "empty.json"
    empty.write_text('[{"conversations": [{"from": "gpt", "value": "no question"}]}]')
    assert "no conversation with a human turn" in error("--dataset-name", "sharegpt", "--dataset-path", str(empty))
    assert "no such file" in error("--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "nope.json"))
    assert "needs --dataset-path" in error("--dataset-name", "sharegpt")
    assert "--goodput" in error("--goodput", "ttft=100")
    assert "unknown metric 'itl'" in error("--goodput", "itl:100")
    assert "--percentile-metrics" in error("--percentile-metrics", "ttft,latency")
    assert "--metric-percentiles" in error("--metric-percentiles", "99,101")
    assert "--random-range-ratio" in error("--random-range-ratio", "1.5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{closed}"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
    # As a user runs it: an error line, no traceback.
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    p = subprocess.run([sys.executable, "-m", "dejavu", "bench", "serve", "--url", url, "--dataset-name",
                        "sharegpt", "--dataset-path", str(bad)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"dataset {bad} is not valid JSON" in p.stderr


def test_kill_worker_failover(tmp_path):
    """--kill-worker: a failure-free pass, then the same load with stage 1 killed; the report has
    the recovery (from /v1/cluster) and the inflation of the requests in flight at the kill."""
    from conftest import alive

    # Without prefix caching: the failure pass repeats the baseline's prompts, and hits would shorten it.
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60,
              enable_prefix_caching=False)
    srv = ApiServer(llm, MODEL)
    port = srv.start_background()
    first = llm.engine.worker_info[1]["pid"]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([[16, 128]] * 6))  # long enough that the kill at 0.5 s lands mid-pass
    out = tmp_path / "f.json"
    for _ in range(300):  # the warm spare registers (and is told which weights to hold) in the background
        if llm.engine.recovery.weights.asked:
            break
        time.sleep(0.1)
    try:
        rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--trace", str(trace),
                   "--kill-worker", "stage:1", "--kill-at", "0.5", "--json", str(out)])
        respawned = llm.engine.worker_info[1]["pid"]
    finally:
        srv.stop()
    r = json.loads(out.read_text())
    assert rc == 0 and r["killed"]["pid"] == first and r["killed"]["worker"] == "s1.0"
    assert r["baseline"]["completed"] == r["failure"]["completed"] == 6
    assert r["recovery"]["recovery_s"] > 0 and r["affected_requests"] >= 1
    # kill -> first resumed token, in parts that add up (measured in the same run as the failure-free pass)
    rec = r["recovery"]
    assert rec["first_token_s"] > 0 and rec["weights_from"] == "host"  # the warm spare held its weights
    parts = rec["detect_s"] + rec["respawn_s"] + rec["kv_fetch_s"] + rec["rest_s"] + rec["first_token_s"]
    assert abs(parts - rec["to_first_token_s"]) < 1e-6 and r["baseline_itl"]["p50"] > 0
    assert r["latency_inflation"]["max"] > 1.0
    assert respawned != first and not alive(first)
