"""Fault tolerance: real worker processes killed with SIGKILL (or stopped) mid-run. Every request
completes and its full output equals the failure-free run's, greedy and seeded sampling alike."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from conftest import alive
from dejavu import LLM, SamplingParams
from dejavu.kvstream.replica import (ReplicaClient, ReplicaError, ReplicaServer, block_checksums, mac_key,
                                    slot_checksums)
from dejavu.parallel.auth import cluster_prefix

MODEL = "random:llama-tiny"
PROMPTS = [[5, 6, 7], [9] * 10, list(range(1, 14)), [100], list(range(200, 231)), [7] * 20, [3, 4], [50] * 6]
GREEDY = SamplingParams(max_tokens=36, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=36, ignore_eos=True, temperature=0.8, top_k=20, seed=7)
PARAMS = [GREEDY if i % 2 == 0 else SEEDED for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(device="cpu", model=MODEL, block_size=4)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def run(llm, kills, sig=signal.SIGKILL, ready=None):
    """Half the requests first, the rest after 2 steps; kills = [(after this many steps, rank)].
    ready(engine, rank): a kill also waits (the engine stepping on) until it says True."""
    eng = llm.engine
    seqs = [eng.add_request(p, sp) for p, sp in zip(PROMPTS[:4], PARAMS[:4])]
    steps, pending = 0, sorted(kills)
    killed = []
    while eng.has_unfinished() or steps < 2:
        if steps == 2:
            seqs += [eng.add_request(p, sp) for p, sp in zip(PROMPTS[4:], PARAMS[4:])]
        while pending and pending[0][0] <= steps and (ready is None or ready(eng, pending[0][1])):
            _, rank = pending.pop(0)
            pid = eng.worker_info[rank]["pid"]
            os.kill(pid, sig)
            killed.append(pid)
        eng.step()
        steps += 1
    assert not pending, "the run ended before every kill"
    return [s.output_ids for s in seqs], killed


def finish(llm, killed=()):
    procs = list(llm.engine.procs)
    llm.shutdown()
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)  # a stopped one (SIGSTOP) is killed by the controller; be sure
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    assert not any(alive(p.pid) for p in procs), "a worker outlived the engine"


# ---------------------------------------------------------------------- the replica store itself
def test_replica_store_applies_slots_and_detects_corruption(tmp_path):
    token = "t" * 32
    srv = ReplicaServer(token, directory=str(tmp_path), prefix="c-")
    shape = (3, 5, 2, 4, 2, 8)  # layers, blocks, K/V, block size, heads, head dim
    cache = torch.randn(shape)
    try:
        cli = ReplicaClient("127.0.0.1", srv.port, token)
        cli.open("s1.0", shape, torch.float32)
        blocks, slots = [4, 4, 1], [0, 1, 3]
        payload = cache.permute(1, 3, 0, 2, 4, 5)[torch.tensor(blocks), torch.tensor(slots)].permute(1, 0, 2, 3, 4)
        cli.put_slots("s1.0", blocks, slots, payload.contiguous().view(torch.uint8).reshape(-1))
        data, chk = cli.get_blocks("s1.0", [4, 1])
        x = data.view(torch.float32).view(3, 2, 2, 4, 2, 8)
        assert torch.equal(x[:, 0, :, 0], cache[:, 4, :, 0]) and torch.equal(x[:, 1, :, 3], cache[:, 1, :, 3])
        key = mac_key(token, "s1.0")  # on disk: each slot's checksum is its MAC
        ok = block_checksums(x, [4, 1], key) == chk.view(2, 4)
        assert ok[0, 0] and ok[0, 1] and ok[1, 3]
        # Corrupt the file on disk under the holder: the checksum no longer matches.
        path = tmp_path / "c-s1.0.kv"
        raw = bytearray(path.read_bytes())
        off = (4 * 2 * 4 * 2 * 8) * 4  # layer 0, block 4, K, slot 0
        raw[off] ^= 0xFF
        path.write_bytes(bytes(raw))
        data, chk = cli.get_blocks("s1.0", [4])
        assert not bool((block_checksums(data.view(torch.float32).view(3, 1, 2, 4, 2, 8), [4], key)
                         == chk.view(1, 4))[0, 0])
        # Rewritten with CRCs to match: a CRC would accept it, the MAC does not.
        _rewrite_consistently(tmp_path / "c-s1.0")
        data, chk = cli.get_blocks("s1.0", [4, 1])
        x = data.view(torch.float32).view(3, 2, 2, 4, 2, 8)
        assert bool((block_checksums(x) == chk.view(2, 4)).all())  # CRCs fixed up: a CRC check is fooled
        assert not bool((block_checksums(x, [4, 1], key) == chk.view(2, 4)).any())
        srv.stop()
        srv = ReplicaServer(token, directory=str(tmp_path), prefix="c-")
        cli = ReplicaClient("127.0.0.1", srv.port, token)
        cli.open("s1.0", shape, torch.float32)
        cli.put_slots("s1.0", blocks, slots, payload.contiguous().view(torch.uint8).reshape(-1))
        # A replacement holder reopens the same files (from their .meta) and still has the replica.
        srv2 = ReplicaServer(token, directory=str(tmp_path), prefix="c-")
        cli2 = ReplicaClient("127.0.0.1", srv2.port, token)
        data2, chk2 = cli2.get_blocks("s1.0", [1])
        x2 = data2.view(torch.float32).view(3, 1, 2, 4, 2, 8)
        assert torch.equal(x2[:, 0, :, 3], cache[:, 1, :, 3])
        assert bool((block_checksums(x2, [1], key) == chk2.view(1, 4))[0, 3])
        assert not bool((block_checksums(x2, [4], key) == chk2.view(1, 4))[0, 3])  # a slot moved elsewhere fails
        with pytest.raises(ReplicaError, match="no replica"):
            cli2.get_blocks("s9.0", [0])
        with pytest.raises(ReplicaError, match="out of range"):
            cli2.put_slots("s1.0", [99], [0], payload[:, :1].contiguous().view(torch.uint8).reshape(-1))
        srv2.stop()
        assert slot_checksums(payload).shape == (3,)
    finally:
        srv.stop()
    with pytest.raises(ReplicaError, match="bad cluster token"):
        srv3 = ReplicaServer(token)
        try:
            ReplicaClient("127.0.0.1", srv3.port, "wrong")
        finally:
            srv3.stop()


def _packed_slot_crc(x):
    """The definition: each slot's bytes packed layer-major (K then V per layer), one CRC-32C each."""
    from dejavu import _C

    y = x.permute(1, 0, *range(2, x.dim())).contiguous().view(torch.uint8)
    per = y.numel() // y.shape[0]
    return torch.tensor([_C.crc32c(y.data_ptr() + j * per, per) for j in range(y.shape[0])], dtype=torch.int64)


def test_replicator_thread_survives_a_failing_item():
    """A step whose slots cannot be gathered (here: a position outside its block table) must not kill
    the sending thread: replication to that holder stops (no more acknowledgements, so watermarks
    stay where they were), and drain() still returns instead of waiting forever."""
    from types import SimpleNamespace

    from dejavu.engine.kv_cache import PagedKVCache
    from dejavu.kvstream.transports import new_cluster_token
    from dejavu.serving.replication import Replicator

    cache = PagedKVCache(2, 8, 4, 2, 8, torch.float32, torch.device("cpu"))
    token, acks = new_cluster_token(), []
    worker = SimpleNamespace(cache=cache, device=cache.device,
                             cfg=SimpleNamespace(timeout=10.0, kv_token=token), rank=0, ch=SimpleNamespace(send=acks.append))
    srv = ReplicaServer(token)
    try:
        rep = Replicator(worker, "w0")
        rep.set_holder(("127.0.0.1", srv.port))
        rep.after_step(1, [([0], 0, 2)])
        rep.after_step(2, [([], 0, 1)])  # a position outside its block table: fails in order
        rep.after_step(3, [([1], 0, 1)])
        t = threading.Thread(target=rep.drain, daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "drain() hung: the sending thread died"
        assert [m.id for m in acks if m.t == "replicated"] == [1]
        assert torch.equal(srv.mirrors["w0"].data[:, 0, :, :2], cache.tensor[:, 0, :, :2])
    finally:
        srv.stop()


def test_in_place_checksums_equal_the_packed_definition():
    """slot/block checksums read the slots in place (one C++ call); they must equal the CRC of the
    packed bytes for contiguous, permuted and non-dense inputs, or a replica check would be wrong."""
    g = torch.Generator().manual_seed(3)
    blocks = torch.randn(3, 5, 2, 4, 2, 8, generator=g).half()       # [layers, nb, 2, bs, heads, dim]
    want = _packed_slot_crc(blocks.permute(0, 1, 3, 2, 4, 5).reshape(3, 20, 2, 2, 8)).view(5, 4)
    assert torch.equal(block_checksums(blocks), want)
    slots = torch.randn(3, 7, 2, 2, 8, generator=g)
    assert torch.equal(slot_checksums(slots), _packed_slot_crc(slots))
    permuted = torch.randn(7, 3, 2, 2, 8, generator=g).permute(1, 0, 2, 3, 4)
    assert torch.equal(slot_checksums(permuted), _packed_slot_crc(permuted))
    not_dense = torch.randn(3, 7, 2, 8, 2, generator=g).transpose(3, 4)
    assert torch.equal(slot_checksums(not_dense), _packed_slot_crc(not_dense))
    flipped = slots.clone()
    flipped[1, 4, 1, 0, 3] += 1.0                                     # one value of slot 4
    diff = slot_checksums(flipped) != slot_checksums(slots)
    assert diff.tolist() == [j == 4 for j in range(7)]


def test_bad_fault_tolerance_options_are_refused():
    with pytest.raises(ValueError, match="pp >= 2"):
        LLM(device="cpu", model=MODEL, replicate=True)
    with pytest.raises(ValueError, match="replicate_to"):
        LLM(device="cpu", model=MODEL, pp=2, replicate=True, replicate_to=[0, 1])
    with pytest.raises(ValueError, match="recovery"):
        LLM(device="cpu", model=MODEL, pp=2, recovery="sometimes")


# ---------------------------------------------------------------------- pipelines
LATE_PROMPT_TOKENS = sum(len(p) for p in PROMPTS[4:])


@pytest.mark.parametrize("pp,kills,replicate,most", [
    # early, the last stage (it samples): the late requests' prefill may not be replicated yet
    (2, [(3, 1)], True, LATE_PROMPT_TOKENS + 2 * len(PROMPTS)),
    (2, [(25, 0)], True, 2 * len(PROMPTS)),     # late, the first stage
    (3, [(10, 1)], True, 3 * len(PROMPTS)),     # a middle stage
    (2, [(12, 1)], False, None),                # no replicas: the paper's baseline, requests start over
    (2, [(20, 1)], 4, 5 * len(PROMPTS)),        # replicas sent 4 steps at a time: up to 3 steps more behind
])
def test_killed_worker_resumes_exactly(reference, pp, kills, replicate, most):
    llm = LLM(device="cpu", model=MODEL, pp=pp, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=bool(replicate))
    killed = []
    try:
        if replicate is not True and replicate:
            llm.engine.set_replication(True, every=replicate)
        got, killed = run(llm, kills)
        assert got == reference
        ft = llm.engine.fault_tolerance()
        assert ft["failures"] == 1 and ft["recoveries"][0]["workers"] == [f"s{kills[0][1]}.0"]
        ev = ft["recoveries"][0]
        if replicate:
            # Only tokens above the watermark (the steps not yet acknowledged by every holder) are recomputed.
            assert ev["recomputed_tokens"] <= most, ev
            assert ev["bad_replicas"] == 0 and ft["replicated_bytes"] > 0
        else:
            assert ev["recomputed_tokens"] >= 20, ev  # everything before the failure, from the prompts on
        new_pid = llm.engine.worker_info[kills[0][1]]["pid"]
        assert new_pid not in killed and alive(new_pid)
    finally:
        finish(llm, killed)


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_token_worker_killed_at_a_random_moment(reference, seed):
    """Disaggregated, replicated: a random token worker dies at a random step (seeded)."""
    import random

    rng = random.Random(seed)
    at, rank = rng.randrange(3, 40), rng.choice([1, 2])
    llm = LLM(device="cpu", model=MODEL, prompt_stages=1, token_stages=2, block_size=4, kv_cache_blocks=256, worker_timeout=60,
              replicate=True)
    killed = []
    try:
        got, killed = run(llm, [(at, rank)])
        assert got == reference, (at, rank)
        ev = llm.engine.fault_tolerance()["recoveries"][0]
        assert ev["workers"] == [f"t{rank - 1}.0"] and ev["bad_replicas"] == 0
    finally:
        finish(llm, killed)


def test_replication_pauses_between_requests_only(reference):
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True)
    eng = llm.engine
    try:
        eng.set_replication(False)
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
        eng.idle_check()
        assert eng.fault_tolerance()["replicated_bytes"] == 0 and not eng.replication.pending
        eng.set_replication(True, every=3)  # batched: every step is still acknowledged
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
        for _ in range(50):
            eng.idle_check()
            if not eng.replication.pending:
                break
            time.sleep(0.05)
        assert not eng.replication.pending and eng.fault_tolerance()["replicated_bytes"] > 0
        with pytest.raises(ValueError, match="every must be"):
            eng.set_replication(True, every=0)
        eng.set_replication(True)
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
        for _ in range(50):  # the last acknowledgements arrive after the tokens
            eng.idle_check()
            if eng.fault_tolerance()["replicated_bytes"] > 0:
                break
            time.sleep(0.05)
        assert eng.fault_tolerance()["replicated_bytes"] > 0
        eng.add_request(PROMPTS[0], GREEDY)
        with pytest.raises(RuntimeError, match="no request runs"):
            eng.set_replication(False)
        while eng.has_unfinished():
            eng.step()
    finally:
        finish(llm)
    with pytest.raises(ValueError, match="does not replicate"):
        plain = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=64)
        try:
            plain.engine.set_replication(True)
        finally:
            plain.shutdown()


def test_two_workers_killed_in_a_row(reference):
    llm = LLM(device="cpu", model=MODEL, pp=3, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True)
    killed = []
    try:
        got, killed = run(llm, [(4, 0), (16, 1)])
        assert got == reference
        ft = llm.engine.fault_tolerance()
        assert [e["workers"] for e in ft["recoveries"]] == [["s0.0"], ["s1.0"]]
        assert all(e["recomputed_tokens"] <= 3 * len(PROMPTS) and e["bad_replicas"] == 0 for e in ft["recoveries"])
    finally:
        finish(llm, killed)


def test_hung_worker_is_detected_by_heartbeats(reference):
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True,
              heartbeat_interval=0.2, heartbeat_timeout=1.0)
    killed = []
    try:
        t0 = time.monotonic()
        got, killed = run(llm, [(6, 1)], sig=signal.SIGSTOP)
        assert got == reference
        ev = llm.engine.fault_tolerance()["recoveries"][0]
        assert "heartbeat" in ev["reason"]
        assert time.monotonic() - t0 < 30
        time.sleep(0.3)
        assert not alive(killed[0]), "the silent worker was not stopped for good"
    finally:
        finish(llm, killed)


def _rewrite_consistently(base):
    """What an attacker who can write the replica files does: new KV, and each slot's CRC-32C
    recomputed to match it (the MAC needs the cluster token's key, which they lack)."""
    meta = json.loads(open(f"{base}.meta").read())
    dtype = getattr(torch, meta["dtype"])
    x = torch.from_file(f"{base}.kv", shared=True, size=int(torch.Size(meta["shape"]).numel()), dtype=dtype)
    x = x.view(meta["shape"])
    x.copy_(torch.randn(x.shape).to(dtype))
    chk = torch.from_file(f"{base}.chk", shared=True, size=meta["shape"][1] * meta["shape"][3], dtype=torch.int64)
    chk.copy_(block_checksums(x).view(-1))


def test_corrupted_replica_is_never_used(reference, tmp_path):
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True,
              replicate_dir=str(tmp_path))
    eng = llm.engine
    killed = []
    try:
        seqs = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
        for _ in range(14):
            eng.step()
        base = tmp_path / f"{cluster_prefix(eng.token)}s1.0"  # s1.0's replica, held by s0.0
        _rewrite_consistently(base)
        pid = eng.worker_info[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        while eng.has_unfinished():
            eng.step()
        assert [s.output_ids for s in seqs] == reference
        ev = eng.fault_tolerance()["recoveries"][0]
        assert ev["bad_replicas"] > 0 and ev["recomputed_tokens"] > len(PROMPTS), ev
    finally:
        finish(llm, killed)


def test_standby_worker_takes_over(reference):
    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True,
              recovery="standby")
    eng = llm.engine
    standby = subprocess.Popen([sys.executable, "-m", "dejavu", "worker", "--controller", eng.controller_addr,
                                "--standby"], env=dict(os.environ, DEJAVU_CLUSTER_TOKEN=eng.token),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    eng.procs.append(standby)
    killed = []
    try:
        for _ in range(100):  # the standby registers in the background
            eng.idle_check()
            if eng._standbys:
                break
            time.sleep(0.1)
        assert eng._standbys, "the standby never registered"
        got, killed = run(llm, [(5, 0)])
        assert got == reference
        assert eng.worker_info[0]["pid"] == standby.pid
    finally:
        finish(llm, killed)


# ---------------------------------------------------------------------- disaggregation
def _token_kill_ready(at_kill: dict):
    """A `ready` for run(): a token worker is killed only once every request is on the token side
    with its admitted KV (its prompt) acknowledged by the replica holders. Then `at_kill["bound"]`
    is what a recovery may recompute: each sequence's tokens past its replicated watermark, plus
    one for a step that completes after the kill; `at_kill["from_prompt"]` what starting over from
    the prompts would. (Without the wait, the kill may land between an admission and its
    acknowledgement, and that request is then rightly recomputed from its prompt.) How far the
    watermark trails the sequence depends on how fast the acknowledgements come back, so the test
    takes the bound from the state at the kill rather than assume a lag."""
    def ready(eng, rank):
        if rank < eng.token_first:
            return True
        if eng.waiting or any(eng.prompt_inflight) or eng.admitting or eng.token_waiting or eng.ready:
            return False  # a request not yet on the token side
        live = eng._token_side()
        if not all(eng.replication.watermark_of(s) >= s.num_prompt_tokens for s in live):
            return False
        at_kill["bound"] = sum(len(s) - eng.replication.watermark_of(s) for s in live)
        at_kill["from_prompt"] = sum(len(s) - 1 for s in live)
        return True
    return ready


def test_disaggregated_prompt_and_token_workers_killed(reference):
    llm = LLM(device="cpu", model=MODEL, prompt_stages=1, token_stages=2, block_size=4, kv_cache_blocks=256, worker_timeout=60,
              replicate=True)
    killed, at_kill = [], {}
    try:
        # rank 0 is the prompt worker (killed while the late requests are being prefilled), 1 and 2 token workers
        got, killed = run(llm, [(2, 0), (12, 2)], ready=_token_kill_ready(at_kill))
        assert got == reference
        evs = llm.engine.fault_tolerance()["recoveries"]
        assert [e["workers"] for e in evs] == [["p0.0"], ["t1.0"]]
        assert evs[0]["recomputed_tokens"] == 0  # a prompt worker holds no decode KV
        # the token worker's recovery resumes each request from its replicated watermark
        assert evs[1]["recomputed_tokens"] <= at_kill["bound"] < at_kill["from_prompt"]
    finally:
        finish(llm, killed)


# ---------------------------------------------------------------------- through the HTTP API
def _stream(base, prompt, sp, out):
    body = {"prompt": prompt, "max_tokens": sp.max_tokens, "ignore_eos": True, "stream": True,
            "temperature": sp.temperature, "top_k": sp.top_k}
    if sp.seed is not None:
        body["seed"] = sp.seed
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    ids = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:") and not line.endswith("[DONE]"):
                for c in json.loads(line[5:]).get("choices", []):
                    ids += c.get("token_ids", [])
    out.append(ids)


@pytest.mark.parametrize("replicate", [True, False])
def test_streams_survive_a_worker_killed_under_http_load(reference, replicate):
    from dejavu.serving.api import ApiServer

    llm = LLM(device="cpu", model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=replicate)
    srv = ApiServer(llm, MODEL)
    base = f"http://127.0.0.1:{srv.start_background()}"
    results = [[] for _ in PROMPTS]
    threads = [threading.Thread(target=_stream, args=(base, p, sp, results[i]))
               for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))]
    pid = llm.engine.worker_info[1]["pid"]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while llm.engine.num_generated < 3 * len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        # Every streamed token exactly once: the concatenated stream is the failure-free output.
        assert [r[0] if r else None for r in results] == reference
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "dejavu_worker_failures_total 1" in text and "dejavu_recoveries_total 1" in text
        with urllib.request.urlopen(base + "/v1/cluster", timeout=10) as r:
            cluster = json.loads(r.read())
        assert cluster["fault_tolerance"]["failures"] == 1
        assert all(w["state"] == "up" for w in cluster["workers"]) and cluster["workers"][1]["pid"] != pid
    finally:
        srv.stop()
        finish(llm, [pid])


def test_disk_replicas_survive_both_workers_killed(reference, tmp_path):
    """--replicate-dir: both stage workers of pp=2 die at once (each held the other's replica). The
    replacements reopen the replica files the dead holders left and restore from them: only the
    tokens past the watermark are recomputed, the output equals the failure-free run, and the
    files are private (600, directory 700) and gone after a clean shutdown."""
    d = tmp_path / "replicas"
    llm = LLM(model=MODEL, pp=2, block_size=4, kv_cache_blocks=256, worker_timeout=60, replicate=True,
              replicate_dir=str(d))
    killed = []
    try:
        got, killed = run(llm, [(20, 0), (20, 1)])
        assert got == reference
        ft = llm.engine.fault_tolerance()
        recomputed = sum(ev["recomputed_tokens"] for ev in ft["recoveries"])
        assert sum(ev["bad_replicas"] for ev in ft["recoveries"]) == 0, ft
        assert recomputed <= 3 * len(PROMPTS), ft  # from the prompts would be hundreds
        assert (d.stat().st_mode & 0o777) == 0o700
        files = sorted(p.name for p in d.iterdir())
        assert files and all((d / f).stat().st_mode & 0o777 == 0o600 for f in files), files
    finally:
        finish(llm, killed)
    assert list(d.iterdir()) == [], "replica files outlived a clean shutdown"
