"""The controller is not a single point of failure: a real `dejavu serve --pp 2` (front-end and
controller in separate processes), its controller killed with SIGKILL while streams are mid-way.
The front-end hands the deployment to its standby controller, which adopts the live workers (same pids) in a later epoch;
every stream finishes with exactly the tokens of a failure-free run, and /v1/cluster shows the new
controller."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from dejavu import LLM, SamplingParams
from dejavu.serving.engine_link import Submit, WireParams, params_from_wire, params_to_wire

MODEL = "random:llama-tiny"
PROMPTS = [[5, 6, 7], [9] * 10, list(range(1, 14))]
BODIES = [{"max_tokens": 48, "ignore_eos": True, "temperature": 0},
          {"max_tokens": 48, "ignore_eos": True, "temperature": 0.8, "top_k": 20, "seed": 7},
          {"max_tokens": 40, "ignore_eos": True, "temperature": 0}]


def _params(body):
    return SamplingParams(**{k: v for k, v in body.items()})


@pytest.fixture(scope="module")
def reference():
    llm = LLM(device="cpu", model=MODEL, block_size=4, kv_cache_blocks=256, seed=0)  # as served below
    return [o.token_ids for o in llm.generate(PROMPTS, [_params(b) for b in BODIES])]


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as f:
        return json.loads(f.read())


def _role(cluster, role):
    return [w for w in cluster["workers"] if w["role"] == role]


def _stream(port, prompt, body, out, progress):
    """One streaming completion; its token ids in `out` (or the exception)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "stream": True, **body}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        ids, events = [], []
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            events.append(ev)
            if "error" in ev:
                raise RuntimeError(f"the stream failed: {ev['error']}")
            ids += ev["choices"][0]["token_ids"]
            progress.append(len(ids))
        out.append((ids, events[-1]["choices"][0]["finish_reason"]))
    except Exception as e:  # noqa: BLE001 - the test reports it
        out.append(e)
    finally:
        conn.close()


def test_controller_killed_mid_stream_requests_continue_exactly(tmp_path, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "dejavu", "serve", "--model", MODEL, "--block-size", "4",
                             "--kv-cache-blocks", "256", "--pp", "2", "--port", str(port)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                _get(port, "/health")
                break
            except OSError:
                assert time.time() < deadline, log_path.read_text()
                time.sleep(0.3)
        before = _get(port, "/v1/cluster")
        [ctl] = _role(before, "controller")
        [standby] = _role(before, "standby-controller")  # started ahead: it takes over
        workers = {w["rank"]: w["pid"] for w in _role(before, "stage")}
        assert len(workers) == 2 and ctl["state"] == "up" and ctl["pid"] != proc.pid
        outs = [[] for _ in PROMPTS]
        progress = [[] for _ in PROMPTS]
        threads = [threading.Thread(target=_stream, args=(port, p, b, o, g))
                   for p, b, o, g in zip(PROMPTS, BODIES, outs, progress)]
        for t in threads:
            t.start()
        while not all(progress) and time.time() < deadline:  # every stream has tokens: mid-stream
            time.sleep(0.05)
        assert all(progress), outs
        os.kill(ctl["pid"], signal.SIGKILL)
        for t in threads:
            t.join(120)
        for (ids, reason), ref, body in zip([o[0] for o in outs], reference, BODIES):
            assert ids == ref and reason == "length" and len(ids) == body["max_tokens"]
        after = _get(port, "/v1/cluster")
        [new] = _role(after, "controller")
        assert new["pid"] == standby["pid"] and new["state"] == "up" and new["restarts"] == 1
        assert len(_role(after, "standby-controller")) == 1  # the next one
        # the live workers were adopted, not replaced
        assert {w["rank"]: w["pid"] for w in _role(after, "stage")} == workers
        [restart] = after["fault_tolerance"]["controller_restarts"]
        assert restart["old_pid"] == ctl["pid"] and restart["pid"] == new["pid"] and restart["adopted"]
        with pytest.raises(ProcessLookupError):
            os.kill(ctl["pid"], 0)
        # and the deployment goes on serving
        out, prog = [], []
        _stream(port, PROMPTS[0], BODIES[0], out, prog)
        assert out[0][0] == reference[0]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_engine_link_messages_round_trip_and_refuse_bad_fields():
    from dejavu.cluster.messages import MessageError, decode, encode

    p = SamplingParams(max_tokens=5, temperature=0.5, seed=3, stop=["x"], logit_bias={7: -1.5}, logprobs=2)
    msg = Submit(rid=1, prompt=[1, 2], text=None, params=params_to_wire(p), seed=3, emitted=[4])
    back = decode(encode(msg))
    assert params_from_wire(back.params) == p and back.emitted == [4]
    bad = {"t": "submit", "rid": 1, "prompt": [1], "text": None, "params": {}, "seed": 1, "emitted": []}
    with pytest.raises(MessageError, match="params"):
        decode(bad)
    w = params_to_wire(p)
    w.max_tokens = 0
    with pytest.raises(ValueError, match="max_tokens"):
        params_from_wire(w)
    assert isinstance(back.params, WireParams)
