"""Hostile HTTP clients: bad fields, huge prompts, slow or too many connections, shutdown mid-stream,
fuzzed bodies. Each against a real server on a loopback port; the engine must keep serving."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from dejavu import LLM, SamplingParams
from dejavu.engine.sequence import Sequence
from dejavu.serving.api import ApiServer
from dejavu.serving.http_limits import HttpLimits

MODEL = "random:llama-tiny"
PLAIN = {"prompt": "The plain request", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def http(url, body=None, raw=None, headers=None, timeout=30):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def plain_tokens(base):
    code, text = http(base + "/v1/completions", PLAIN)
    assert code == 200, text
    return json.loads(text)["choices"][0]["token_ids"]


def raw_request(port, data: bytes, timeout=10.0) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b"Content-Length" in got:
                    head, _, rest = got.partition(b"\r\n\r\n")
                    n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(rest) >= n:
                        break
        except socket.timeout:
            pass
        return got


def post_bytes(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


@pytest.fixture(scope="module")
def server():
    llm = LLM(model=MODEL, block_size=4, kv_cache_blocks=256, max_model_len=256)
    srv = ApiServer(llm, MODEL, max_queue=64)
    port = srv.start_background()
    base = f"http://127.0.0.1:{port}"
    yield srv, base, plain_tokens(base)
    srv.stop()


def assert_still_serving(server):
    srv, base, before = server
    assert http(base + "/health")[0] == 200
    assert plain_tokens(base) == before


# ---------------------------------------------------------------------------------------- item 1, 2
@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "ok \ud800 then"}, "prompt"),
    ("/v1/completions", {"prompt": ["\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "\ud83d"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9], "min_tokens": 2}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [49152], "min_tokens": 1}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": list(range(300))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [1, 49152]}, "prompt"),
    ("/v1/completions", {"prompt": [5] * 300, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**40}, "top_k"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}}, "include_usage"),
])
def test_fields_that_used_to_stop_the_engine_are_400(server, path, body, field):
    code, text = http(server[1] + path, body)  # json.dumps sends a lone surrogate as "\ud800"
    assert code == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
    assert_still_serving(server)


@pytest.mark.parametrize("field", ["temperature", "top_p", "seed", "max_tokens", "top_k", "n", "min_tokens"])
@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_400_naming_the_field(server, field, value):
    raw = b'{"prompt": "x", "max_tokens": 4, "%s": %s}' % (field.encode(), value)
    code, text = http(server[1] + "/v1/completions", raw=raw)
    assert code == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == field and field in err["message"], err
    assert http(server[1] + "/health")[0] == 200


def test_a_failing_engine_step_ends_its_requests_only():
    """An exception inside a step (here: a request that skipped validation bans a token id outside
    the vocabulary) ends that step's requests with finish_reason "error"; the engine goes on."""
    llm = LLM(model="random:gpt2-tiny", block_size=4, kv_cache_blocks=64, max_model_len=128)
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    before = llm.generate([[5, 6, 7]], greedy)[0].token_ids
    eng = llm.engine

    def poison():
        seq = Sequence([5, 6, 7], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**9]), seed=1)
        eng._enqueue(seq)  # straight into the scheduler, past add_request's checks
        return seq
    alone = llm.generate([[8, 9]], greedy)[0].token_ids
    good = eng.add_request([8, 9], greedy)
    eng.step()  # its prefill: it decodes while the poison's prefill fails
    bad = poison()
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error" and "IndexError" in bad.error
    assert good.finish_reason == "length" and good.output_ids == alone
    bad, good = poison(), eng.add_request([8, 9], greedy)
    while eng.has_unfinished():
        eng.step()
    assert bad.finish_reason == "error"
    assert good.finish_reason == "error"  # it shared the failing step: one step cannot tell them apart
    assert eng.cache.allocator.num_used == 0
    assert llm.generate([[5, 6, 7]], greedy)[0].token_ids == before
    assert eng.failed_steps == 0  # a good step clears the count of failed ones in a row
    poison()
    with pytest.raises(RuntimeError, match="IndexError"):  # LLM.generate reports a request that failed
        llm.generate([[5, 6, 7]], greedy)
    # Under the serving loop: the poison runs first, then requests are served as before.
    bad = poison()
    srv = ApiServer(llm, "m")
    base = f"http://127.0.0.1:{srv.start_background()}"
    try:
        code, text = http(base + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0,
                                                     "ignore_eos": True})
        assert code == 200 and json.loads(text)["choices"][0]["token_ids"] == before, text
        assert bad.finish_reason == "error" and http(base + "/health")[0] == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------- item 3
def test_non_ascii_authorization_header_is_401():
    llm = LLM(model=MODEL, block_size=4, kv_cache_blocks=64, max_model_len=128)
    srv = ApiServer(llm, MODEL, api_key="s3cret")
    port = srv.start_background()
    try:
        body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
        for value in ("Bearer s3cr\u00e9t".encode(), b"Bearer \xff\xfe\x80", "Bearer \u4e2d\u6587".encode()):
            got = raw_request(port, post_bytes("/v1/completions", body, b"Authorization: " + value + b"\r\n"))
            assert got.startswith(b"HTTP/1.1 401"), got[:200]
            assert b"authentication_error" in got
        ok = raw_request(port, post_bytes("/v1/completions", body, b"Authorization: Bearer s3cret\r\n"))
        assert ok.startswith(b"HTTP/1.1 200"), ok[:300]
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------- item 4
def test_connection_cap_timeouts_and_body_size():
    llm = LLM(model=MODEL, block_size=4, kv_cache_blocks=64, max_model_len=128)
    limits = HttpLimits(max_connections=8, header_timeout=3.0, body_timeout=1.0, max_body_bytes=1 << 16)
    srv = ApiServer(llm, MODEL, limits=limits)
    port = srv.start_background()
    base = f"http://127.0.0.1:{port}"
    try:
        # Eight idle connections fill the cap: the ninth is answered 503 at once and closed.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        time.sleep(0.2)
        t0 = time.monotonic()
        got = raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        assert got.startswith(b"HTTP/1.1 503") and b"too many connections" in got, got[:200]
        assert time.monotonic() - t0 < 2
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and http(base + "/health", timeout=5)[0] != 200:
            time.sleep(0.1)
        _, text = http(base + "/metrics")
        assert "dejavu_http_connections_refused_total 1" in text

        # Headers that never finish: the connection is closed after header_timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            t0 = time.monotonic()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            while True:
                s.sendall(b"X-Slow: 1\r\n")  # trickling does not extend the deadline
                try:
                    s.settimeout(0.5)
                    if s.recv(4096) == b"":
                        break
                except socket.timeout:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    break
                assert time.monotonic() - t0 < 10, "slow headers were never cut off"
            assert 2.5 < time.monotonic() - t0 < 10

        # The deadline restarts after each response: a keep-alive connection outlives it while it
        # sends a request within header_timeout of the previous answer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for i in range(3):
                if i:
                    time.sleep(1.8)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")

        # A body that stops arriving: 408 after body_timeout.
        t0 = time.monotonic()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        got = raw_request(port, head, timeout=10)
        assert got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in got, got[:300]
        assert time.monotonic() - t0 < 8

        # A body over max_body_bytes: 413.
        big = json.dumps({"prompt": "y" * 70000}).encode()
        code, text = http(base + "/v1/completions", raw=big)
        assert code == 413 and "larger than 65536 bytes" in text, text
        code, text = http(base + "/v1/completions", {"prompt": "still fine", "max_tokens": 3})
        assert code == 200, text
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------- item 5
def test_huge_prompts_never_stall_health_or_streams(server):
    srv, base, _ = server
    # Beyond what the context can hold in characters: refused before tokenizing.
    limit = srv.bounds.max_chars
    assert limit is not None and limit < 8 << 20
    t0 = time.monotonic()
    code, text = http(base + "/v1/completions", {"prompt": "word " * (limit // 5 + 10), "max_tokens": 1})
    assert code == 400 and "at most" in text and json.loads(text)["error"]["param"] == "prompt", text
    code, text = http(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "w" * (limit + 1)}]})
    assert code == 400 and json.loads(text)["error"]["param"] == "messages", text

    # A tokenizer without a character bound has to tokenize it all: that runs on the pool while
    # /health answers and a stream keeps getting tokens.
    srv.bounds.max_chars = None
    try:
        gaps, health, done = [], [], threading.Event()

        def stream():  # streams one after another; every wait for a token (the first included)
            body = json.dumps({"prompt": "s", "max_tokens": 100, "stream": True, "ignore_eos": True,
                               "temperature": 0}).encode()
            while not done.is_set():
                req = urllib.request.Request(base + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                last = time.monotonic()
                with urllib.request.urlopen(req, timeout=60) as r:
                    for line in r:
                        if line.startswith(b"data:") and not done.is_set():
                            gaps.append(time.monotonic() - last)
                            last = time.monotonic()

        def probe():
            while not done.is_set():
                t = time.monotonic()
                assert http(base + "/health", timeout=30)[0] == 200
                health.append(time.monotonic() - t)
                time.sleep(0.02)
        threads = [threading.Thread(target=stream), threading.Thread(target=probe)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        huge = "the quick brown fox " * 150_000  # 3 MB, ~600k tokens
        code, text = http(base + "/v1/completions", {"prompt": huge, "max_tokens": 1}, timeout=120)
        took = time.monotonic() - t0
        done.set()
        for t in threads:
            t.join(60)
        assert code == 400 and "context length" in text, text
        assert len(health) >= 5 and max(health) < 0.5, (took, max(health))
        assert len(gaps) >= 20 and max(gaps) < 0.5, (took, max(gaps))
    finally:
        srv.bounds.max_chars = limit
    assert_still_serving(server)


# ---------------------------------------------------------------------------------------- item 6
def test_sigterm_ends_running_streams_at_once():
    cmd = [sys.executable, "-m", "dejavu", "serve", "--model", MODEL, "--kv-cache-blocks", "512", "--block-size", "4"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        taken = subprocess.run(cmd + ["--port", str(port)], capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr, taken.stderr[-500:]
    proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if http(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        body = json.dumps({"prompt": "go", "max_tokens": 1900, "stream": True, "ignore_eos": True}).encode()
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn.sendall(post_bytes("/v1/completions", body))
        got = b""
        while got.count(b"data:") < 3:
            chunk = conn.recv(65536)
            assert chunk, got
            got += chunk
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while chunk := conn.recv(65536):
            got += chunk
        ended = time.monotonic() - t0
        proc.wait(15)
        exited = time.monotonic() - t0
        assert b"shutting down" in got and got.endswith(b"0\r\n\r\n"), got[-300:]
        assert b"data: [DONE]" in got
        assert ended < 5 and exited < 10, (ended, exited)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------- item 7
def _requests():
    """(path, body): valid bodies, valid ones with one hostile field, and hostile ones throughout."""
    from hypothesis import strategies as st

    surrogate = st.characters(categories=["Cs"])
    text = st.one_of(st.text(max_size=12), st.text(st.one_of(st.characters(), surrogate), min_size=1, max_size=6))
    number = st.one_of(st.integers(-3, 20), st.integers(-2**80, 2**80), st.sampled_from([2**63, 10**30, -1, 0]),
                       st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2))
    scalar = st.one_of(st.none(), st.booleans(), number, text)
    junk = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                        max_leaves=6)
    ids = st.lists(st.one_of(st.integers(0, 60000), st.integers(-3, 3), st.integers(2**40, 2**70)), max_size=8)
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text})
    role = st.one_of(st.sampled_from(["user", "system", "assistant", "wizard"]), junk)
    message = st.fixed_dictionaries({"role": role, "content": st.one_of(text, st.lists(part, max_size=2), junk)})
    hostile = {
        "prompt": st.one_of(text, ids, st.lists(text, max_size=2), st.lists(ids, max_size=2), junk),
        "messages": st.one_of(st.lists(message, max_size=3), junk),
        "max_tokens": st.one_of(number, junk), "max_completion_tokens": number,
        "temperature": number, "top_p": number, "top_k": number, "n": number, "min_tokens": number,
        "seed": number, "stop": st.one_of(text, st.lists(text, max_size=3), junk),
        "stop_token_ids": st.one_of(ids, junk), "ignore_eos": junk, "stream": junk,
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": junk}), junk),
        "model": st.one_of(text, junk), "logprobs": junk, "presence_penalty": number,
    }
    plain = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
    valid = {
        "temperature": st.one_of(st.just(0), st.floats(0, 2)),
        "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "n": st.integers(1, 2),
        "min_tokens": st.integers(0, 1), "seed": st.integers(0, 2**63 - 1),
        "stop": st.lists(plain, min_size=1, max_size=2), "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
        "ignore_eos": st.booleans(), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "model": st.just(MODEL),
        "user": plain,  # an unknown field: ignored
    }
    short = st.integers(1, 3)  # (sampled tokens are slow on a CPU: few of them)
    completion = st.tuples(st.just("/v1/completions"), st.fixed_dictionaries(
        {"prompt": st.one_of(plain, st.lists(st.integers(0, 49151), min_size=1, max_size=8)), "max_tokens": short},
        optional=valid))
    chat = st.tuples(st.just("/v1/chat/completions"), st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                     "content": plain}), min_size=1, max_size=3),
         "max_completion_tokens": short}, optional=valid))
    good = st.one_of(completion, chat)
    one_bad = st.builds(lambda pb, kv: (pb[0], {**pb[1], kv[0]: kv[1]}), good,
                        st.sampled_from(sorted(hostile)).flatmap(lambda k: st.tuples(st.just(k), hostile[k])))
    unknown = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in hostile), junk, max_size=2)
    anything = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                         st.one_of(st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries({}, optional=hostile),
                                             unknown), junk))
    return st.one_of(good, one_bad, anything)


def _check_ok(body: dict, path: str, text: str) -> None:
    """A 200 must be a well-formed answer to what was asked."""
    if body.get("stream") is True:
        events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", text[-200:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all("error" not in c for c in chunks), text[-300:]
        assert any(ch["choices"] and ch["choices"][0]["finish_reason"] in ("stop", "length") for ch in chunks)
        return
    r = json.loads(text)
    n = body.get("n") or 1
    assert len(r["choices"]) == n and all(c["finish_reason"] in ("stop", "length") for c in r["choices"]), r
    key = "message" if path.endswith("chat/completions") else "text"
    assert all(key in c for c in r["choices"]), r
    u = r["usage"]
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], r


def test_fuzzed_requests_get_a_4xx_or_a_valid_200(server):
    from hypothesis import HealthCheck, given, settings

    srv, base, before = server
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_requests())
    def check(request):
        path, body = request
        code, text = http(base + path, raw=json.dumps(body).encode(), timeout=30)
        assert code < 500, (body, code, text)
        if code == 200:
            seen["ok"] += 1
            _check_ok(body, path, text)
        else:
            seen["refused"] += 1
            err = json.loads(text)["error"]
            assert 400 <= code < 500 and err["code"] == code and err["message"], (body, text)

    check()
    assert seen["ok"] > 0 and seen["refused"] > 0, seen  # the mix had both valid and hostile bodies
    assert http(base + "/health")[0] == 200
    assert plain_tokens(base) == before
