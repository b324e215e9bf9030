"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from dejavu import LLM  # noqa: E402
from dejavu.serving.api import ApiServer  # noqa: E402

MODEL = "random:llama-tiny"


@pytest.fixture(scope="module")
def server():
    llm = LLM(device="cpu", model=MODEL, block_size=4, kv_cache_blocks=512, max_model_len=512)
    srv = ApiServer(llm, MODEL, max_queue=64)
    port = srv.start_background()
    yield srv, f"http://127.0.0.1:{port}"
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def http(url, body=None, method=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(base, name):
    _, text = http(base + "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_completion_chat_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    again = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens == 5


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="Stream me", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    chat_kw = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=9, temperature=0,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat_kw).choices[0].message.content
    parts = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat_kw)
    parts = list(parts)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole
    assert parts[-1].usage.completion_tokens == 9


def test_seed_n_and_stop(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=10, temperature=1.0, seed=42, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    multi = client.completions.create(n=3, **kw)
    assert [c.index for c in multi.choices] == [0, 1, 2]
    assert multi.choices[0].text == a and multi.usage.completion_tokens == 30
    greedy = client.completions.create(model=MODEL, prompt="stop test", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    marker = greedy[3:5]
    cut = client.completions.create(model=MODEL, prompt="stop test", max_tokens=12, temperature=0, stop=[marker],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and marker not in cut.text and greedy.startswith(cut.text)
    streamed = client.completions.create(model=MODEL, prompt="stop test", max_tokens=12, temperature=0, stop=[marker],
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


@pytest.mark.parametrize("body,status,word", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x" * 3000, "max_tokens": 100}, 400, "context length"),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "'n'"),
    ({"prompt": "x", "stop": [3]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": ["x", 5]}, 400, "prompt"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"prompt": [1, 2, 10**9]}, 400, "token ids"),
    ({}, 400, "prompt"),
])
def test_bad_requests_get_400_and_the_server_stays_up(server, body, status, word):
    base = server[1]
    code, text = http(base + "/v1/completions", body)
    assert code == status, text
    err = json.loads(text)["error"]
    assert word in err["message"] and err["type"] == "invalid_request_error"
    assert http(base + "/health")[0] == 200


def test_malformed_json_and_wrong_shapes(server):
    base = server[1]
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b"null"):
        code, text = http(base + "/v1/completions", raw=raw)
        assert code == 400, text
    code, text = http(base + "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert code == 400 and "role" in text
    code, _ = http(base + "/v1/nothing-here")
    assert code == 404


def test_models_cluster_metrics(server):
    base = server[1]
    code, text = http(base + "/v1/models")
    assert code == 200 and json.loads(text)["data"][0]["id"] == MODEL
    code, text = http(base + "/v1/cluster")
    w = json.loads(text)["workers"][0]
    assert w["pid"] == os.getpid() and w["state"] == "up"
    assert metric(base, "dejavu_requests_total") > 0
    assert metric(base, "dejavu_time_to_first_token_seconds_count") > 0
    assert metric(base, "dejavu_kv_blocks_total") == 512


def test_client_disconnect_frees_blocks(server):
    base = server[1]
    cancelled = metric(base, "dejavu_requests_cancelled_total")
    port = int(base.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "a long one", "max_tokens": 400, "stream": True, "ignore_eos": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data:" not in got:
        chunk = s.recv(4096)
        assert chunk, "server closed the stream"
        got += chunk
    assert metric(base, "dejavu_kv_blocks_used") > 0
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline and (metric(base, "dejavu_kv_blocks_used") > 0
                                      or metric(base, "dejavu_requests_cancelled_total") <= cancelled):
        time.sleep(0.1)
    assert metric(base, "dejavu_kv_blocks_used") == 0
    assert metric(base, "dejavu_requests_cancelled_total") > cancelled


def test_api_key_and_backpressure():
    llm = LLM(device="cpu", model=MODEL, block_size=4, kv_cache_blocks=64, max_model_len=256)
    srv = ApiServer(llm, MODEL, api_key="s3cret", max_queue=1)
    base = f"http://127.0.0.1:{srv.start_background()}"
    try:
        code, text = http(base + "/v1/completions", {"prompt": "x"})
        assert code == 401 and json.loads(text)["error"]["type"] == "authentication_error"
        code, _ = http(base + "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert code == 401
        assert http(base + "/health")[0] == 200  # not behind the key
        import concurrent.futures as cf

        def one(_):
            return http(base + "/v1/completions", {"prompt": "y" * 20, "max_tokens": 60, "ignore_eos": True},
                        headers={"Authorization": "Bearer s3cret"})[0]
        with cf.ThreadPoolExecutor(12) as ex:
            codes = list(ex.map(one, range(12)))
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    finally:
        srv.stop()


def test_fuzzed_bodies_never_5xx(server):
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    base = server[1]
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(-2, 3, allow_nan=False),
                        st.text(max_size=8))
    values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=5), scalars, max_size=3))
    keys = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                            "min_tokens", "ignore_eos", "messages", "model", "stop_token_ids", "stream_options"])
    bodies = st.dictionaries(keys, values, max_size=6)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(bodies, st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def check(body, path):
        if isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool):
            body["max_tokens"] = min(body["max_tokens"], 4)
        code, text = http(base + path, body)
        assert code < 500, (body, text)
    check()
    assert http(base + "/health")[0] == 200


def test_serve_cli_sigterm_stops_workers():
    from test_pipeline import _children, alive

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dejavu", "serve", "--model", MODEL, "--pp", "2", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        code, text = http(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert code == 200, text
        cluster = json.loads(http(f"http://127.0.0.1:{port}/v1/cluster")[1])["workers"]
        assert [w["role"] for w in cluster] == ["frontend", "controller", "standby-controller", "stage", "stage"]
        assert [w["stage"] for w in cluster[3:]] == [0, 1]
        controller, standby = cluster[1]["pid"], cluster[2]["pid"]
        assert sorted(_children(proc.pid)) == sorted([controller, standby])  # the workers are the controller's
        workers = _children(controller)
        assert len(workers) == 3  # two stages and the warm spare kept for recovery
        workers += [controller, standby]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        time.sleep(1)
        assert not any(alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dead_worker_fails_requests_instead_of_hanging():
    """Without recovery (as with tp > 1) a dead worker ends the engine: requests get an error, none hangs.
    (With recovery, the default, see test_fault_tolerance.py.)"""
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=128, worker_timeout=20, recovery="off")
    srv = ApiServer(llm, MODEL)
    base = f"http://127.0.0.1:{srv.start_background()}"
    try:
        assert http(base + "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200
        os.kill(llm.engine.procs[1].pid, signal.SIGKILL)
        t0 = time.time()
        code, text = http(base + "/v1/completions", {"prompt": "after", "max_tokens": 50, "ignore_eos": True})
        assert code in (500, 503) and "worker" in text
        code, text = http(base + "/v1/completions", {"prompt": "later", "max_tokens": 5})
        assert code == 503 and "engine stopped" in text
        assert http(base + "/health")[0] == 503
        assert time.time() - t0 < 40
    finally:
        srv.stop()
