"""DéjàVuLib on CPU: regions round-trip bit-exactly through every transport at every level."""
import random

import pytest
import torch

from dejavu import _C
from dejavu.kvstream import (FileDest, HostMemoryDest, KVStreamer, PinnedPool, Region, StreamError, TcpDest,
                             TcpReplicaServer)
from dejavu.kvstream.transports import new_cluster_token
from kv_helpers import empty_like, filled_cache, region_values


def random_regions(c, rng):
    blocks = rng.sample(range(c.num_blocks), 7)
    layers = sorted(rng.sample(range(c.num_layers), 3))
    slots = [rng.randrange(c.block_size) for _ in blocks]
    return [Region.chunks(layers, blocks), Region.chunks(range(c.num_layers), blocks[:1]),
            Region.chunks([1], list(reversed(blocks))), Region.tokens(layers, blocks, slots)]


@pytest.fixture(scope="module")
def tcp_server():
    token = new_cluster_token()
    s = TcpReplicaServer(token)
    yield s, token
    s.stop()


def destinations(tmp_path, tcp_server):
    server, token = tcp_server
    return {"host": HostMemoryDest(), "file": FileDest(tmp_path / "kv"), "tcp": TcpDest("127.0.0.1", server.port, token)}


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("dest_name", ["host", "file", "tcp"])
def test_stream_out_in_round_trip(level, dest_name, tmp_path, tcp_server):
    rng = random.Random(level * 10 + len(dest_name))
    src = filled_cache(dtype=torch.float16, seed=level)
    dst = empty_like(src)
    a, b = KVStreamer(src, level=level, pool_bytes=1 << 20), KVStreamer(dst, level=level, pool_bytes=1 << 20)
    dest = destinations(tmp_path, tcp_server)[dest_name]
    for i, region in enumerate(random_regions(src, rng)):
        key = f"L{level}.{dest_name}.r{i}"
        a.stream_out(region, dest, key).wait(10)
        b.stream_in(dest, key, region).wait(10)
        assert torch.equal(region_values(dst, region), region_values(src, region)), region
    # Nothing leaked from the pools.
    assert a.pool.used == 0 and b.pool.used == 0


def test_gather_scatter_exact_and_nothing_else_touched():
    src = filled_cache(seed=3)
    s = KVStreamer(src)
    region = Region.chunks([0, 2], [5, 1, 17])
    buf = torch.empty(region.nbytes(s.layout), dtype=torch.uint8)
    s.gather(region, buf).wait()
    expect = torch.cat([src.tensor[l, b].reshape(-1) for l in (0, 2) for b in (5, 1, 17)])
    assert torch.equal(buf.view(torch.float32), expect)
    dst = empty_like(src)
    KVStreamer(dst).scatter(region, buf).wait()
    mask = torch.zeros(src.tensor.shape[:2], dtype=torch.bool)
    for l in (0, 2):
        mask[l, [5, 1, 17]] = True
    assert torch.equal(dst.tensor[mask], src.tensor[mask])
    assert not dst.tensor[~mask].any()


def test_newest_token_of_32_requests():
    """Token-level streaming: one slot per request, across all layers (the replication pattern)."""
    src = filled_cache(layers=6, blocks=64, block_size=16, seed=9)
    rng = random.Random(0)
    blocks = rng.sample(range(64), 32)
    slots = [rng.randrange(16) for _ in blocks]
    region = Region.tokens(range(6), blocks, slots)
    assert region.nbytes(src.layout()) == 6 * 32 * 2 * 2 * 8 * 4
    dest = HostMemoryDest()
    KVStreamer(src).stream_out(region, dest, "tok").wait()
    dst = empty_like(src)
    KVStreamer(dst).stream_in(dest, "tok", region).wait()
    assert torch.equal(region_values(dst, region), region_values(src, region))
    # Only those slots were written.
    assert int((dst.tensor != 0).sum()) == 6 * 32 * 2 * 2 * 8


def test_pool_full_is_a_clear_error():
    pool = PinnedPool(4096, pin=False)
    pool.alloc(4000)
    with pytest.raises(_C.PoolFull, match="pinned host pool full: asked for 1000 bytes"):
        pool.alloc(1000)
    src = filled_cache()
    s = KVStreamer(src, pool_bytes=1024)
    with pytest.raises(MemoryError, match="pool full"):
        s.stream_out(Region.chunks([0], [0, 1, 2]), HostMemoryDest(), "x")


def test_torn_file_chunk_is_never_used(tmp_path):
    src = filled_cache()
    s = KVStreamer(src)
    dest = FileDest(tmp_path)
    region = Region.chunks([0, 1], [3, 4])
    s.stream_out(region, dest, "req1").wait()
    path = dest.store.path("req1")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    dst = empty_like(src)
    with pytest.raises(StreamError, match="truncated"):
        KVStreamer(dst).stream_in(dest, "req1", region).wait()
    assert not dst.tensor.any()
    with pytest.raises(StreamError, match="not found"):
        KVStreamer(dst).stream_in(dest, "never-written", region).wait()


def test_tcp_rejects_bad_token_and_keeps_serving(tcp_server):
    server, token = tcp_server
    before = server.stats().auth_failures
    with pytest.raises(ConnectionError, match="bad cluster token"):
        TcpDest("127.0.0.1", server.port, "not-the-token")
    assert server.stats().auth_failures == before + 1
    src = filled_cache()
    region = Region.chunks([2], [7])
    KVStreamer(src).stream_out(region, TcpDest("127.0.0.1", server.port, token), "after-bad").wait()
    buf = torch.empty(region.nbytes(src.layout()), dtype=torch.uint8)
    server.get_into("after-bad", buf)
    assert torch.equal(buf.view(torch.float32), src.tensor[2, 7].reshape(-1))


def test_server_binds_loopback_by_default(tcp_server):
    assert tcp_server[0].host == "127.0.0.1"


def test_invalid_arguments():
    src = filled_cache()
    with pytest.raises(ValueError, match="streaming level"):
        KVStreamer(src, level=7)
    s = KVStreamer(src)
    with pytest.raises(ValueError, match="uint8 buffer"):
        s.gather(Region.chunks([0], [0]), torch.empty(3, dtype=torch.uint8))
    with pytest.raises(IndexError, match="block 99"):
        s.gather(Region.chunks([0], [99]), torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bad chunk key"):
        FileDest("/tmp/dejavu-keys").put("../x", torch.empty(4, dtype=torch.uint8))


def test_tcp_store_keeps_every_chunk_while_reusing_receive_buffers(tcp_server):
    """The store receives each put into the memory of the chunk it replaced: chunks replaced, grown
    and shrunk on one connection leave every key holding its latest bytes."""
    server, token = tcp_server
    dest = TcpDest("127.0.0.1", server.port, token)
    g = torch.Generator().manual_seed(9)
    latest = {}
    for key, n in [("r.a", 4096), ("r.b", 4096), ("r.a", 4096), ("r.b", 9000), ("r.a", 100), ("r.c", 4096)]:
        buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        dest.put(key, buf).wait(30)
        latest[key] = buf
    for key, want in latest.items():
        got = torch.empty(want.numel(), dtype=torch.uint8)
        assert server.get_into(key, got) == want.numel() and torch.equal(got, want), key


def test_tcp_layers_leave_straight_from_the_cache_pipelined_on_one_connection(tcp_server):
    """A host cache's layers go to a TCP store from their spans (no gather buffer: a pool smaller than
    one layer does), their puts pipelined on one connection: each layer's chunk holds exactly that
    layer's gathered bytes."""
    server, token = tcp_server
    src = filled_cache(layers=6, blocks=32, block_size=8, heads=4, head_dim=16, seed=5)
    region = Region.chunks(range(6), [7, 3, 21, 9, 30])
    a = KVStreamer(src, level=2, pool_bytes=4096)
    assert region.layer(0).nbytes(a.layout) > 4096
    dest = TcpDest("127.0.0.1", server.port, token)
    a.stream_out(region, dest, "lay", layer_events=[None] * 6).wait(30)
    for i in range(6):
        want = torch.empty(region.layer(i).nbytes(a.layout), dtype=torch.uint8)
        KVStreamer(src).gather(region.layer(i), want).wait(10)
        got = torch.empty_like(want)
        assert server.get_into(f"lay.l{i}", got) == want.numel() and torch.equal(got, want), i
    dst = empty_like(src)
    KVStreamer(dst, level=2, pool_bytes=1 << 20).stream_in(dest, "lay", region, per_layer=True).wait(30)
    assert torch.equal(region_values(dst, region), region_values(src, region))
