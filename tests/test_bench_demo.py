"""The load generator against a live server, and the demo as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import needs_smollm2
from dejavu import LLM
from dejavu.bench.serve import load_trace, run, synthetic_lengths
from dejavu.serving.api import ApiServer


def test_synthetic_lengths_are_long_tailed_and_bounded():
    ls = synthetic_lengths(2000, 0, 1024, 512)
    prompts = sorted(p for p, _ in ls)
    outs = sorted(o for _, o in ls)
    assert 4 <= prompts[0] and prompts[-1] <= 1024 and 1 <= outs[0] and outs[-1] <= 512
    assert 150 < prompts[1000] < 260 and 75 < outs[1000] < 130        # medians near 200 / 100
    assert prompts[1900] > 2.5 * prompts[1000]                          # a long tail
    assert synthetic_lengths(5, 1, 1024, 512) == synthetic_lengths(5, 1, 1024, 512)


def test_trace_validation(tmp_path):
    good = tmp_path / "t.json"
    good.write_text("[[10, 5], [3, 2]]")
    assert load_trace(str(good)) == [(10, 5), (3, 2)]
    bad = tmp_path / "b.json"
    bad.write_text('[[10, "x"]]')
    with pytest.raises(ValueError, match="list of \\[prompt_tokens, output_tokens\\]"):
        load_trace(str(bad))


def test_bench_serve_against_a_live_server(tmp_path):
    llm = LLM(device="cpu", model="random:llama-tiny", block_size=4, kv_cache_blocks=1024, max_model_len=512)
    srv = ApiServer(llm, "random:llama-tiny")
    port = srv.start_background()
    try:
        out = tmp_path / "r.json"
        lengths = synthetic_lengths(12, 3, 64, 12)
        r = run(f"http://127.0.0.1:{port}/v1", lengths, rate=40.0, json_path=str(out), progress=False)
    finally:
        srv.stop()
    data = json.loads(out.read_text())
    assert data["completed"] == 12 and data["failed"] == 0
    assert data["total_output_tokens"] == sum(o for _, o in lengths)
    for key in ("ttft_s", "itl_s", "normalized_latency_s_per_token", "latency_s"):
        assert set(data[key]) == {"p50", "p95", "p99", "mean"}
        assert data[key]["p50"] is not None and data[key]["p50"] <= data[key]["p99"]
    assert data["throughput_output_tokens_per_s"] > 0 and r == data


@needs_smollm2
def test_demo_runs():
    r = subprocess.run([sys.executable, "-m", "dejavu", "demo", "--device", "cpu", "--max-tokens", "24"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert "batch throughput" in r.stdout and "time to first token" in r.stdout
