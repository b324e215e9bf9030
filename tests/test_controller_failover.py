"""The controller is not a single point of failure: a real `dejavu serve --pp 2` (front-end and
controller in separate processes), its controller killed with SIGKILL while streams are mid-way.
The front-end hands the deployment to its standby controller, which adopts the live workers (same pids) in a later epoch;
every stream finishes with exactly the tokens of a failure-free run, and /v1/cluster shows the new
controller."""
import contextlib
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
from dejavu.cluster import adopt
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


@contextlib.contextmanager
def serving(tmp_path, *argv):
    """A real `dejavu serve` (front-end and controller processes) on a free port; yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "dejavu", "serve", "--model", MODEL, "--block-size", "4",
                             "--kv-cache-blocks", "256", "--port", str(port), *argv],
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
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _fault_mid_stream(port, reference, sig, roles):
    """Streams every prompt, strikes the controller with `sig` once each has tokens, and checks what
    every take-over must show: exact streams, the standby took over, the workers (of `roles`)
    adopted with their pids, the old controller gone, serving goes on. Returns (the take-over
    record, the moment of the fault)."""
    before = _get(port, "/v1/cluster")
    [ctl] = _role(before, "controller")
    [standby] = _role(before, "standby-controller")  # started ahead: it takes over
    workers = {w["rank"]: w["pid"] for w in before["workers"] if w["role"] in roles}
    assert ctl["state"] == "up" and workers
    outs = [[] for _ in PROMPTS]
    progress = [[] for _ in PROMPTS]
    threads = [threading.Thread(target=_stream, args=(port, p, b, o, g))
               for p, b, o, g in zip(PROMPTS, BODIES, outs, progress)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while not all(progress) and time.time() < deadline:  # every stream has tokens: mid-stream
        time.sleep(0.05)
    assert all(progress), outs
    struck = time.time()
    os.kill(ctl["pid"], sig)
    for t in threads:
        t.join(120)
    for (ids, reason), ref, body in zip([o[0] for o in outs], reference, BODIES):
        assert ids == ref and reason == "length" and len(ids) == body["max_tokens"]
    after = _get(port, "/v1/cluster")
    [new] = _role(after, "controller")
    assert new["pid"] == standby["pid"] and new["state"] == "up" and new["restarts"] == 1
    assert len(_role(after, "standby-controller")) == 1  # the next one
    # the live workers were adopted, not replaced
    assert {w["rank"]: w["pid"] for w in after["workers"] if w["role"] in roles} == workers
    [restart] = after["fault_tolerance"]["controller_restarts"]
    assert restart["old_pid"] == ctl["pid"] and restart["pid"] == new["pid"] and restart["adopted"]
    with pytest.raises(ProcessLookupError):
        os.kill(ctl["pid"], 0)
    # and the deployment goes on serving
    out, prog = [], []
    _stream(port, PROMPTS[0], BODIES[0], out, prog)
    assert out[0][0] == reference[0]
    return restart, struck


def test_controller_killed_mid_stream_requests_continue_exactly(tmp_path, reference):
    with serving(tmp_path, "--pp", "2") as port:
        restart, _ = _fault_mid_stream(port, reference, signal.SIGKILL, ("stage",))
        assert restart["reason"].startswith("its channel closed")


def test_hung_controller_is_replaced_within_the_controller_timeout(tmp_path, reference):
    """SIGSTOP: the channel stays open and the process lives; the silence of its status gives it
    away after --controller-timeout (2 s here), not before, and the standby takes over."""
    with serving(tmp_path, "--pp", "2", "--controller-timeout", "2") as port:
        restart, struck = _fault_mid_stream(port, reference, signal.SIGSTOP, ("stage",))
        assert restart["reason"] == "no status for 2s"
        noticed = restart["at"] - restart["restart_s"] - struck  # from the SIGSTOP to the take-over's start
        assert 1.5 <= noticed <= 4.0, noticed  # (statuses are 0.25 s apart: the last may precede the stop)


def test_disaggregated_workers_rejoin_the_next_controller(tmp_path, reference):
    """--prompt-stages 1 --token-stages 1: the prompt and the token worker outlive the controller's
    SIGKILL and are adopted (same pids), and the streams go on exactly."""
    with serving(tmp_path, "--prompt-stages", "1", "--token-stages", "1") as port:
        _fault_mid_stream(port, reference, signal.SIGKILL, ("prompt", "token"))


def _recovered_once(port, rank):
    """SIGKILL stage `rank` and wait for the controller's recovery: (the controller's entry, each
    rank's pid) from /v1/cluster afterwards."""
    workers = {w["rank"]: w["pid"] for w in _role(_get(port, "/v1/cluster"), "stage")}
    os.kill(workers[rank], signal.SIGKILL)
    deadline = time.time() + 60
    while not _get(port, "/v1/cluster")["fault_tolerance"]["recoveries"]:
        assert time.time() < deadline
        time.sleep(0.2)
    mid = _get(port, "/v1/cluster")
    [ctl] = _role(mid, "controller")
    return ctl, {w["rank"]: w["pid"] for w in _role(mid, "stage")}


def test_a_worker_lost_with_its_controller_means_new_workers_at_once(tmp_path, reference):
    """A worker recovered by the first controller, then the controller hung (SIGSTOP) and a worker
    killed while it is: the front-end sees the dead worker in the last status and starts the next
    controller with new workers at once (not after the 30 s wait for a rejoin that cannot come);
    the first controller's recovery still counts in /v1/cluster."""
    with serving(tmp_path, "--pp", "2", "--controller-timeout", "2") as port:
        ctl, workers = _recovered_once(port, 0)
        os.kill(ctl["pid"], signal.SIGSTOP)
        os.kill(workers[1], signal.SIGSTOP)  # hung: killed by the front-end, which starts new workers
        out, prog = [], []
        _stream(port, PROMPTS[0], BODIES[0], out, prog)  # submitted meanwhile, served by the next controller
        assert out[0][0] == reference[0]
        after = _get(port, "/v1/cluster")
        [restart] = after["fault_tolerance"]["controller_restarts"]
        assert restart["old_pid"] == ctl["pid"] and not restart["adopted"] and restart["restart_s"] < 20, restart
        assert not set(workers.values()) & {w["pid"] for w in _role(after, "stage")}
        assert len(after["fault_tolerance"]["recoveries"]) == 1 and after["fault_tolerance"]["failures"] == 1
        deadline = time.time() + 10
        while adopt.proc_state(workers[1]) not in (None, "Z"):  # (reaped by init, or a zombie until then)
            assert time.time() < deadline, "the hung worker outlived its deployment"
            time.sleep(0.1)


def test_a_replacement_worker_rejoins_the_next_controller(tmp_path, reference):
    """A worker replaced by the first controller (a warm spare promoted to its rank) is adopted by
    the next one as that rank, like the workers started with the deployment."""
    with serving(tmp_path, "--pp", "2") as port:
        ctl, workers = _recovered_once(port, 1)
        os.kill(ctl["pid"], signal.SIGKILL)
        out, prog = [], []
        _stream(port, PROMPTS[1], BODIES[1], out, prog)
        assert out[0][0] == reference[1]
        after = _get(port, "/v1/cluster")
        [restart] = after["fault_tolerance"]["controller_restarts"]
        assert restart["adopted"] and restart["restart_s"] < 20, restart
        assert {w["rank"]: w["pid"] for w in _role(after, "stage")} == workers


def test_adopting_fails_at_once_when_a_worker_to_adopt_is_gone(tmp_path):
    from dejavu.cluster.errors import WorkerError

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    class Membership:  # what the check reads: the ranks that rejoined
        channels = {0: None}

    adopt.expect_workers({0: os.getpid(), 1: gone.pid})
    try:
        with pytest.raises(WorkerError, match=f"worker rank 1 \\(pid {gone.pid}\\) is gone"):
            adopt.check_missing(Membership())
        Membership.channels = {0: None, 1: None}
        adopt.check_missing(Membership())  # every rank rejoined: nothing to wait for
    finally:
        adopt._pids.clear()
        adopt._pending = False


@pytest.mark.parametrize("value, message", [("0.5", "--controller-timeout must be at least 1 s"),
                                            ("0", "--controller-timeout must be a finite number > 0")])
def test_a_too_short_controller_timeout_is_refused(value, message, capsys):
    from dejavu.cli import main

    with pytest.raises(SystemExit) if value == "0" else contextlib.nullcontext():
        assert main(["serve", "--model", MODEL, "--pp", "2", "--port", "0", "--controller-timeout", value]) == 2
    assert message in capsys.readouterr().err


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
