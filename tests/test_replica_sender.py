"""DéjàVuLib's native replica sender (csrc/kvstream/replica_sender.cpp, through serving/replication.py's
Replicator) against the real holder (kvstream/replica.py's ReplicaServer) over real sockets: what
arrives, in which order, split into frames, and what happens when a holder refuses or a step is bad."""
import threading
from types import SimpleNamespace

import torch

from dejavu import _C
from dejavu.engine.kv_cache import PagedKVCache
from dejavu.kvstream.replica import ReplicaServer
from dejavu.kvstream.transports import new_cluster_token
from dejavu.serving.replication import Replicator


def _worker(cache, token):
    acks = []
    return SimpleNamespace(cache=cache, device=cache.device, cfg=SimpleNamespace(timeout=10.0, kv_token=token), rank=3,
                           ch=SimpleNamespace(send=acks.append)), acks


def _cache(seed=0, dtype=torch.float16):
    cache = PagedKVCache(3, 10, 4, 2, 8, dtype, torch.device("cpu"))
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def _drained(rep):
    t = threading.Thread(target=rep.drain, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "drain() hung"


def test_slots_blocks_and_holder_changes_arrive_in_order():
    """Slots land at the same (layer, block, slot) in the holder's mirror; a holder change splits the
    stream exactly where it was queued; whole blocks re-seed a holder; every step is acknowledged
    with the bytes sent so far, in order."""
    token = new_cluster_token()
    cache = _cache()
    a, b = ReplicaServer(token), ReplicaServer(token)
    worker, acks = _worker(cache, token)
    rep = Replicator(worker, "w0")
    try:
        rep.set_holder(("127.0.0.1", a.port))
        rep.after_step(1, [([2, 5], 0, 6), ([7], 1, 3)])  # a prompt across two blocks, and two positions
        rep.after_step(2, [([2, 5], 6, 7)])
        rep.set_holder(("127.0.0.1", b.port))
        rep.after_step(3, [([7], 3, 4)])
        rep.send_blocks(4, [2, 5])
        _drained(rep)
        assert [(m.t, m.id, m.rank) for m in acks] == [
            ("replicated", 1, 3), ("replicated", 2, 3), ("replicated", 3, 3), ("rereplicated", 4, 3)]
        slot = 3 * 2 * 2 * 8 * 2  # layers x K/V x heads x dim x 2 bytes
        block = 4 * slot
        assert [m.bytes for m in acks] == [8 * slot, 9 * slot, 10 * slot, 10 * slot + 2 * block]
        assert rep.bytes == acks[-1].bytes
        ma, mb = a.mirrors["w0"].data, b.mirrors["w0"].data
        t = cache.tensor
        assert torch.equal(ma[:, 2], t[:, 2]) and torch.equal(ma[:, 5, :, :3], t[:, 5, :, :3])
        assert torch.equal(ma[:, 7, :, 1:3], t[:, 7, :, 1:3])
        assert not torch.equal(ma[:, 7, :, 3], t[:, 7, :, 3])       # step 3 went to the second holder
        assert torch.equal(mb[:, 7, :, 3], t[:, 7, :, 3])
        assert torch.equal(mb[:, 2], t[:, 2]) and torch.equal(mb[:, 5], t[:, 5])  # re-seeded whole
        # the holder keeps per-slot checksums of what it applied: they verify
        from dejavu.kvstream.replica import block_checksums
        data, chk = b.mirrors["w0"].get_blocks([2, 5])
        assert torch.equal(block_checksums(data), chk)
    finally:
        rep.close()
        a.stop()
        b.stop()


def _three_slot_frames(seed, name):
    """A float32 cache, a holder, and a bare sender whose frames hold at most 3 token slots."""
    token = new_cluster_token()
    cache = _cache(seed, torch.float32)
    srv = ReplicaServer(token)
    layout = cache.layout()
    slot = 2 * layout.token_bytes() * cache.num_layers
    sender = _C.ReplicaSender(layout, cache.tensor.data_ptr(), -1, name, token, "float32", 10.0, 3 * slot)
    return cache, srv, sender, slot


def test_large_items_go_as_several_frames():
    """An item larger than one frame (a long prompt admitted at once) is split into several frames,
    each a complete message the holder checks on its own; the mirror ends up whole."""
    cache, srv, sender, slot = _three_slot_frames(1, "big")
    try:
        sender.set_holder("127.0.0.1", srv.port)
        sender.push_slots(1, [([0, 1, 2, 3, 4, 5, 6, 7], 0, 31)], 0)  # 31 slots -> 11 frames
        sender.push_blocks(2, [8, 9, 1], 0)                             # 3 blocks of 4 slots -> 3 frames
        assert sender.drain(30)
        events = sender.wait_events(5.0, 0.0)
        assert [(e.kind, e.tag, e.error) for e in events] == [("replicated", 1, ""), ("rereplicated", 2, "")]
        m = srv.mirrors["big"].data
        t = cache.tensor
        assert torch.equal(m[:, :7], t[:, :7]) and torch.equal(m[:, 7, :, :3], t[:, 7, :, :3])
        assert torch.equal(m[:, 8:], t[:, 8:])
        assert sender.bytes() == 31 * slot + 3 * 4 * slot
    finally:
        sender.close()
        srv.stop()


def test_a_refusing_holder_or_a_bad_step_stops_acknowledgements():
    """A holder with another cluster token refuses the connection: nothing is acknowledged, a
    re-seed reports the failure. With a good holder, a step naming a position outside its block
    table fails in order: the steps before it are acknowledged, none after it (the watermark stays
    a prefix) until the holder is set again."""
    token = new_cluster_token()
    cache = _cache(2)
    worker, acks = _worker(cache, token)
    wrong, good = ReplicaServer(new_cluster_token()), ReplicaServer(token)
    rep = Replicator(worker, "w1")
    try:
        rep.set_holder(("127.0.0.1", wrong.port))
        rep.after_step(1, [([0], 0, 1)])
        rep.send_blocks(2, [0])
        _drained(rep)
        assert [(m.t, m.id, m.error is not None) for m in acks] == [("rereplicated", 2, True)]
        assert "w1" not in wrong.mirrors
        acks.clear()
        rep.set_holder(("127.0.0.1", good.port))
        rep.after_step(3, [([0], 1, 2)])
        rep.after_step(4, [([0], 4, 5)])    # position 4 needs a second block
        rep.after_step(5, [([1], 0, 1)])
        _drained(rep)
        assert [m.id for m in acks] == [3]
        rep.set_holder(("127.0.0.1", good.port))
        rep.after_step(6, [([1], 1, 2)])
        _drained(rep)
        assert [m.id for m in acks] == [3, 6]
        assert torch.equal(good.mirrors["w1"].data[:, 1, :, 1], cache.tensor[:, 1, :, 1])
    finally:
        rep.close()
        wrong.stop()
        good.stop()


def test_batched_steps_are_each_acknowledged():
    """every=3: consecutive steps share a gather and a frame; each is still acknowledged, in order,
    and a holder change in the middle of a batch still takes effect between the right steps."""
    token = new_cluster_token()
    cache = _cache(3)
    worker, acks = _worker(cache, token)
    srv = ReplicaServer(token)
    rep = Replicator(worker, "w2")
    try:
        rep.every = 3
        rep.set_holder(("127.0.0.1", srv.port))
        for step in range(1, 8):
            rep.after_step(step, [([4, 6], step - 1, step)])
        _drained(rep)
        assert [m.id for m in acks] == list(range(1, 8))
        assert torch.equal(srv.mirrors["w2"].data[:, 4, :, :4], cache.tensor[:, 4, :, :4])
        assert torch.equal(srv.mirrors["w2"].data[:, 6, :, :3], cache.tensor[:, 6, :, :3])
    finally:
        rep.close()
        srv.stop()


def test_device_cache_gather_is_ordered_after_the_step():
    """A CUDA cache: the sender's copy kernel (on its own stream) waits for the event recorded after
    the step's work, so slots written by a long-running stream arrive with their new values."""
    import pytest

    if not torch.cuda.is_available() or not _C.cuda_compiled():
        pytest.skip("needs a CUDA device and a CUDA build")
    token = new_cluster_token()
    dev = torch.device("cuda", 0)
    cache = PagedKVCache(4, 32, 16, 8, 128, torch.float16, dev)
    worker, acks = _worker(cache, token)
    srv = ReplicaServer(token)
    rep = Replicator(worker, "gpu")
    try:
        rep.set_holder(("127.0.0.1", srv.port))
        side = torch.cuda.Stream(dev)
        for step in range(1, 6):
            with torch.cuda.stream(side):
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the step's writes
                cache.tensor[:, 3, :, step] = float(step)
                cache.tensor[:, 9, :, step] = -float(step)
                rep.after_step(step, [([3], step, step + 1), ([0, 9], 16 + step, 17 + step)])
        _drained(rep)
        torch.cuda.synchronize(dev)
        assert [m.id for m in acks] == [1, 2, 3, 4, 5]
        m, t = srv.mirrors["gpu"].data, cache.tensor.cpu()
        assert torch.equal(m[:, 3, :, 1:6], t[:, 3, :, 1:6]) and torch.equal(m[:, 9, :, 1:6], t[:, 9, :, 1:6])
        assert float(m[0, 3, 0, 5, 0, 0]) == 5.0
        # A whole prompt at once (more slots than the copy engine path takes: the copy kernel) and
        # whole blocks (copy-engine 2-D copies) land exactly as well.
        cache.tensor.normal_()
        rep.after_step(6, [(list(range(4, 24)), 0, 300), ([30], 0, 16)])
        rep.send_blocks(7, [1, 2, 3, 25])
        _drained(rep)
        assert [m.id for m in acks][-2:] == [6, 7]
        m, t = srv.mirrors["gpu"].data, cache.tensor.cpu()
        assert torch.equal(m[:, 4:22], t[:, 4:22]) and torch.equal(m[:, 22, :, :12], t[:, 22, :, :12])
        assert torch.equal(m[:, 30], t[:, 30]) and torch.equal(m[:, [1, 2, 3, 25]], t[:, [1, 2, 3, 25]])
    finally:
        rep.close()
        srv.stop()


def test_holder_refuses_bad_data_frames_and_stays_in_sync():
    """The holder's C++ data path: a frame whose payload fails its CRC-32C is refused and never
    applied; a payload of the wrong size and an unknown mirror are answered with errors; the
    connection stays usable after each, and a good frame then lands."""
    import socket
    import struct

    import msgpack

    from dejavu.kvstream.replica import _recv, _send

    token = new_cluster_token()
    srv = ReplicaServer(token)
    shape = (2, 4, 2, 4, 2, 8)
    row = 2 * 2 * 2 * 8 * 4  # one slot: 2 layers x K, V x 2 heads x 8 dims x 4 bytes
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        _send(sock, {"t": "hello", "token": token})
        assert _recv(sock)[0]["t"] == "ok"
        _send(sock, {"t": "open", "src": "s", "shape": list(shape), "dtype": "float32"})
        assert _recv(sock)[0]["t"] == "ok"
        good = torch.arange(row // 4, dtype=torch.float32).view(torch.uint8)

        def frame(payload, crc, **extra):
            hdr = msgpack.packb({"t": "put_slots", "src": "s", "blocks": [2], "slots": [1], "n": payload.numel(),
                                 "crc": crc, **extra})
            sock.sendall(struct.pack(">I", len(hdr)) + hdr + payload.numpy().tobytes())
            return _recv(sock)[0]

        crc = _C.crc32c(good.data_ptr(), good.numel())
        assert frame(good, crc ^ 1) == {"t": "err", "msg": "replica payload failed its CRC-32C", "n": 0}
        assert srv.refused == 1 and not srv.mirrors["s"].chk.any()
        short = good[:-4]
        reply = frame(short, _C.crc32c(short.data_ptr(), short.numel()))
        assert reply["t"] == "err" and "does not hold 1 token slots" in reply["msg"]
        reply = frame(good, crc, slots=[9])
        assert reply["t"] == "err" and "slot out of range [0, 4)" in reply["msg"]
        _send(sock, {"t": "put_slots", "src": "nobody", "blocks": [0], "slots": [0]}, good)
        reply = _recv(sock)[0]
        assert reply["t"] == "err" and "no replica of nobody" in reply["msg"]
        assert frame(good, crc) == {"t": "ok", "n": 0}
        m = srv.mirrors["s"]
        want = good.view(torch.float32).view(2, 2, 2, 8)  # [layers, K/V, heads, dim]
        assert torch.equal(m.data[:, 2, :, 1], want)
        assert int(m.chk[2, 1]) == crc and srv.bytes_in == row
        sock.close()
    finally:
        srv.stop()


def _small_ring(rep, cache, rows):
    """Give the Replicator a ring of `rows` rows (the default has at least 256)."""
    from dejavu.models.layers import KVRing

    t = torch.zeros((cache.num_layers, rows, 2, cache.num_kv_heads, cache.head_dim), dtype=cache.dtype)
    rep.native.ring_attach(t.data_ptr(), rows)
    rep.ring = KVRing(t, cache.tensor)
    return t


def _ring_setup(seed, name, rows):
    """A cache, a holder, and a Replicator with a ring of `rows` rows replicating to it."""
    token = new_cluster_token()
    cache = _cache(seed)
    worker, acks = _worker(cache, token)
    srv = ReplicaServer(token)
    rep = Replicator(worker, name)
    ring = _small_ring(rep, cache, rows)
    rep.set_holder(("127.0.0.1", srv.port))
    return cache, acks, srv, rep, ring


def _ring_step(rep, ring, cache, step, slots):
    """A decode step as the write-KV kernel runs it: stage ring rows for (block, slot) pairs, store
    each slot's K/V into the cache (fresh values) and into its ring row, then after_step."""
    import numpy as np

    blocks = np.array([b for b, _ in slots], np.int64)
    offs = np.array([s for _, s in slots], np.int64)
    first = rep.stage(blocks, offs)
    for i, (b, s) in enumerate(slots):
        cache.tensor[:, b, :, s] = float(step) + i / 8
        if first >= 0:
            ring[:, first + i] = cache.tensor[:, b, :, s]
    rep.after_step(step, [([b], s, s + 1) for b, s in slots])
    return first


def test_ring_steps_arrive_in_order_with_wraps_and_fallbacks():
    """Decode steps through the step ring: rows are reserved consecutively and wrap at the end of
    the ring; a step that finds the ring full goes the gather way instead, in the same FIFO order;
    whatever the path, every step is acknowledged in order and the holder's mirror holds exactly
    the values each step wrote."""
    token = new_cluster_token()
    cache = _cache(4)
    rep = Replicator(_worker(cache, token)[0], "default")
    try:
        assert rep.ring is not None and rep.ring.tensor.shape[1] >= 256  # the default ring
    finally:
        rep.close()
    cache, acks, srv, rep, ring = _ring_setup(4, "r0", 5)
    try:
        rep.native.set_every(10, 30.0)  # the sending thread holds ring steps back (a batch of up to 10)
        assert _ring_step(rep, ring, cache, 1, [(2, 0), (3, 0)]) == 0
        assert _ring_step(rep, ring, cache, 2, [(2, 1), (3, 1)]) == 2
        # 3 more rows fit only at the start, where step 1's rows are still in flight: the ring is
        # full, and the step is gathered instead (which also closes the held batch).
        assert _ring_step(rep, ring, cache, 3, [(2, 2), (3, 2), (4, 0)]) == -1
        assert rep.ring_misses == 1
        _drained(rep)
        assert _ring_step(rep, ring, cache, 4, [(5, 0), (6, 0)]) == 0  # rows 4 and 0 would split: wrapped to 0
        assert _ring_step(rep, ring, cache, 5, [(5, 1)]) == 2
        rep.after_step(6, [([7], 0, 3)])  # not staged (an admission): the gather way, in order
        _drained(rep)
        assert _ring_step(rep, ring, cache, 7, [(5, 2), (6, 1), (7, 3)]) == 0
        _drained(rep)
        assert [m.id for m in acks] == [1, 2, 3, 4, 5, 6, 7]
        m, t = srv.mirrors["r0"].data, cache.tensor
        written = [(2, 0), (3, 0), (2, 1), (3, 1), (2, 2), (3, 2), (4, 0), (5, 0), (6, 0), (5, 1), (7, 0), (7, 1),
                   (7, 2), (5, 2), (6, 1), (7, 3)]
        for b, s in written:
            assert torch.equal(m[:, b, :, s], t[:, b, :, s]), (b, s)
        slot = 2 * cache.layout().token_bytes() * cache.num_layers
        assert acks[-1].bytes == len(written) * slot == rep.bytes
        assert rep.ring_misses == 1
    finally:
        rep.close()
        srv.stop()


def test_next_ring_row_is_the_senders_next_reservation():
    """_C.next_ring_row (kvstream/ring_rows.h: the rule the graphs' greedy kernel advances ring rows by, so
    a replicated step can run without an input copy) predicts what ReplicaSender::ring_stage
    reserves next for a step of the same size, across wraps, for each size of step that fits the
    ring; -1 where the step before took no rows."""
    from dejavu._C import next_ring_row

    rows = 7
    assert next_ring_row(-1, 3, rows) == -1 and next_ring_row(2, 3, 0) == -1
    for n in range(1, rows + 1):
        cache, acks, srv, rep, ring = _ring_setup(6, f"n{n}", rows)
        try:
            last = -1
            for step in range(1, 3 * rows // n + 3):
                slots = [(1 + i % 9, step % cache.block_size) for i in range(n)]
                first = _ring_step(rep, ring, cache, step, slots)
                assert first >= 0, (n, step)
                if last >= 0:
                    assert first == next_ring_row(last, n, rows), (n, step, last, first)
                last = first
                _drained(rep)  # (the sender never falls behind here: every reservation fits)
            assert len(acks) == step
        finally:
            rep.close()
            srv.stop()


def test_ring_reservations_of_abandoned_steps_are_taken_back():
    """A staged step that never reaches after_step gives its rows back (staging again or
    cancel_staged), and a commit whose token count differs from what was staged falls back to the
    gather: no row ever goes out under another step's id."""
    import numpy as np

    cache, acks, srv, rep, ring = _ring_setup(5, "r1", 4)
    try:
        assert rep.stage(np.array([1, 2], np.int64), np.array([0, 0], np.int64)) == 0  # abandoned
        assert rep.stage(np.array([1], np.int64), np.array([1], np.int64)) == 0        # same rows again
        rep.cancel_staged()
        assert _ring_step(rep, ring, cache, 1, [(1, 2), (2, 2), (3, 2), (4, 2)]) == 0   # the whole ring
        _drained(rep)
        first = rep.stage(np.array([8], np.int64), np.array([3], np.int64))
        assert first == 0
        cache.tensor[:, 8, :, 3] = 7.0   # the staged row is never written ...
        rep.after_step(2, [([8, 9], 3, 5)])  # ... and the step says it wrote 2 tokens: gathered instead
        assert rep.stage(np.array([0], np.int64), np.array([9], np.int64)) == -1  # a slot outside the block
        _drained(rep)
        assert [m.id for m in acks] == [1, 2]
        m, t = srv.mirrors["r1"].data, cache.tensor
        assert torch.equal(m[:, 8, :, 3], t[:, 8, :, 3]) and torch.equal(m[:, 9, :, 0], t[:, 9, :, 0])
        assert torch.equal(m[:, 1:5, :, 2], t[:, 1:5, :, 2])
    finally:
        rep.close()
        srv.stop()


def test_ring_frames_split_and_batch():
    """Ring steps larger than a frame go as several frames, and every > 1 batches ring steps into
    shared frames, including runs of rows on both sides of the ring's wrap; the mirror is exact."""
    import numpy as np

    cache, srv, sender, slot = _three_slot_frames(6, "rf")
    ring = torch.zeros((cache.num_layers, 8, 2, cache.num_kv_heads, cache.head_dim), dtype=cache.dtype)
    sender.ring_attach(ring.data_ptr(), 8)

    def step(tag, pairs):
        blocks = np.array([b for b, _ in pairs], np.int64)
        slots = np.array([s for _, s in pairs], np.int64)
        first = sender.ring_stage(blocks, slots)
        for i, (b, s) in enumerate(pairs):
            cache.tensor[:, b, :, s] = torch.randn(cache.tensor[:, b, :, s].shape)
            ring[:, first + i] = cache.tensor[:, b, :, s]
        assert sender.ring_commit(tag, len(pairs), 0)
        return first

    try:
        sender.set_holder("127.0.0.1", srv.port)
        one = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
        assert step(1, one) == 0      # 7 rows: 3 frames of at most 3 slots
        assert sender.drain(30)
        sender.set_every(3, 5.0)      # the next three steps share frames
        batch = [[(2, 0)], [(2, 1), (3, 0)], [(3, 1), (4, 3)]]
        assert [step(2 + i, pairs) for i, pairs in enumerate(batch)] == [7, 0, 2]  # row 7, then wrapped
        assert sender.drain(30)
        events = sender.wait_events(5.0, 0.0)
        assert [(e.kind, e.tag) for e in events] == [("replicated", t) for t in range(1, 5)]
        m, t = srv.mirrors["rf"].data, cache.tensor
        for b, s in one + [p for pairs in batch for p in pairs]:
            assert torch.equal(m[:, b, :, s], t[:, b, :, s]), (b, s)
        assert sender.bytes() == 12 * slot and sender.ring_misses() == 0
    finally:
        sender.close()
        srv.stop()


def test_ring_through_the_engine_and_its_cuda_graphs(tmp_path):
    """The whole ring path on a GPU: decode steps replayed from CUDA graphs captured with the ring
    write each new token's K/V into pinned host memory from the write-KV kernel, the sender sends
    those rows, and the holder's mirror equals the device cache; the gather path in the same run
    as well (bench decode --replicate checks both). The replicated steps stay overlapped: each is
    queued (with input ids -1) before the tokens of the one before are read."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    if not torch.cuda.is_available() or not _C.cuda_compiled():
        pytest.skip("needs a CUDA device and a CUDA build")
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "-m", "dejavu", "bench", "decode", "--model", "random:opt-tiny", "--device",
                        "cuda", "--dtype", "float16", "--batch", "1,5", "--prompt-len", "40", "--max-tokens", "30",
                        "--no-hf", "--replicate", "--pairs", "2", "--replicate-path", "ring,gather", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["cuda_graphs"] is True
    for row in res["rows"]:
        assert row["replicate_acked"] == "116/116" and row["replica_exact"] is True  # 2 pairs x 2 paths x 29 steps
        assert row["replicate_ring_misses"] == 0
        assert row["replicate_chained_steps"] == 2 * 2 * 28  # overlapped: every step after each run's first
        # Ring steps run from the inputs the step before left on the device, ring rows included
        # (at batch 5 the 256-row ring wraps), as often as the gather path's steps do.
        ring, gather = row["replicate_by_path"]["ring"], row["replicate_by_path"]["gather"]
        assert ring["advanced_steps"] == gather["advanced_steps"] > 2 * 20
        # The device's share of the ring: the graph replayed with and without ring stores.
        assert row["ring_gpu_on_ms"] > 0 and row["ring_gpu_off_ms"] > 0


def test_ring_burst_is_acknowledged_in_order():
    """Steps arriving faster than the holder answers: the sending thread batches what queued up and
    sends the next batches before the holder answered the last (a few in flight); ring-full steps
    go the gather way in between. Every step is acknowledged once, in order, and the mirror is
    exact."""
    cache, acks, srv, rep, ring = _ring_setup(7, "rb", 16)
    try:
        written = []
        for step in range(1, 121):
            pairs = [((step * 3 + i) % 10, (step + i) % 4) for i in range(1 + step % 3)]
            _ring_step(rep, ring, cache, step, pairs)
            written += pairs
        _drained(rep)
        assert [m.id for m in acks] == list(range(1, 121))
        m, t = srv.mirrors["rb"].data, cache.tensor
        for b, s in set(written):
            assert torch.equal(m[:, b, :, s], t[:, b, :, s]), (b, s)
        slot = 2 * cache.layout().token_bytes() * cache.num_layers
        assert rep.bytes == len(written) * slot
    finally:
        rep.close()
        srv.stop()


def test_replica_throughput_benchmark_runs(tmp_path):
    """benchmarks/replica_throughput.py (ring against gather, host only): every step of both paths
    acknowledged, figures written."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "thr.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "replica_throughput.py")
    r = subprocess.run([sys.executable, script, "--model", "opt-125m", "--batch", "5", "--steps", "30", "--repeat",
                        "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    slot = 2 * 12 * 12 * 64 * 2
    for path in ("ring", "gather"):
        (run,) = res["runs"][path]
        assert run["bytes"] == 30 * 5 * slot and run["GBps"] > 0
    assert "ring / gather (medians)" in r.stdout
    r = subprocess.run([sys.executable, script, "--steps", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "must be positive" in r.stderr


def test_a_standby_ring_uses_the_pinned_memory_it_kept():
    """A replacement that was a standby takes its step ring from the pinned memory the standby
    allocated ahead (models/preload.py), not a new pinned allocation."""
    import pytest

    from dejavu.models.preload import PRELOADER

    if not torch.cuda.is_available() or not _C.cuda_compiled():
        pytest.skip("needs a CUDA device and a CUDA build")
    token = new_cluster_token()
    cache = PagedKVCache(4, 64, 16, 8, 128, torch.float16, torch.device("cuda", 0))
    PRELOADER.pinned = torch.empty(16 << 20, dtype=torch.uint8, pin_memory=True)
    kept = PRELOADER.pinned.data_ptr()
    worker, _ = _worker(cache, token)
    rep = Replicator(worker, "standby")
    try:
        assert rep.ring is not None and rep.ring.tensor.data_ptr() == kept and PRELOADER.pinned is None
        assert rep.ring.tensor.is_pinned()
    finally:
        rep.close()
