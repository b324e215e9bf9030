"""stream_out / stream_in routing between sides of different pipeline depth and TP degree."""
import itertools

import pytest
import torch

from dejavu.engine.kv_cache import PagedKVCache
from dejavu.kvstream import HostMemoryDest, KVStreamer
from dejavu.kvstream import routed
from dejavu.kvstream.routing import WorkerLayout, layouts, plan, split_layers

LAYERS, HEADS, BS, HD = 6, 4, 4, 8


def test_split_layers():
    assert split_layers(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert split_layers(24, 1) == [(0, 24)]
    with pytest.raises(ValueError, match="pipeline depth 7"):
        split_layers(6, 7)


@pytest.mark.parametrize("dp,tp_p,dt,tp_t", [(1, 1, 2, 1), (2, 1, 1, 1), (2, 1, 3, 1), (3, 2, 2, 1), (1, 2, 2, 4),
                                              (2, 4, 3, 2)])
def test_plan_covers_every_layer_and_head_once(dp, tp_p, dt, tp_t):
    senders, receivers = layouts("p", LAYERS, dp, tp_p), layouts("t", LAYERS, dt, tp_t)
    transfers = plan(senders, receivers, HEADS)
    covered = {}
    for t in transfers:
        for layer, h in itertools.product(range(*t.layers), range(*t.heads)):
            assert (layer, h) not in covered
            covered[(layer, h)] = t
        s = next(w for w in senders if w.worker == t.src)
        r = next(w for w in receivers if w.worker == t.dst)
        assert s.layer_start <= t.layers[0] < t.layers[1] <= s.layer_end
        assert r.layer_start <= t.layers[0] < t.layers[1] <= r.layer_end
    assert len(covered) == LAYERS * HEADS


def test_plan_rejects_bad_layouts():
    with pytest.raises(ValueError, match="cannot be split"):
        plan(layouts("p", LAYERS, 1, 3), layouts("t", LAYERS, 1, 1), HEADS)
    overlapping = [WorkerLayout("a", 0, 4), WorkerLayout("b", 3, 6)]
    with pytest.raises(ValueError, match="held by both"):
        plan(overlapping, layouts("t", LAYERS, 1, 1), HEADS)


def shard(full: torch.Tensor, w: WorkerLayout, blocks_map: dict[int, int], num_blocks: int) -> PagedKVCache:
    """A worker's cache holding its layers and heads of `full`, at its own block ids."""
    h0, h1 = w.heads(HEADS)
    c = PagedKVCache(w.layer_end - w.layer_start, num_blocks, BS, h1 - h0, HD, full.dtype, torch.device("cpu"))
    for gb, lb in blocks_map.items():
        c.tensor[:, lb] = full[w.layer_start:w.layer_end, gb, :, :, h0:h1]
    return c


@pytest.mark.parametrize("dp,tp_p,dt,tp_t", [(1, 1, 2, 1), (2, 1, 3, 1), (3, 2, 2, 1), (2, 2, 2, 2), (1, 1, 1, 2)])
def test_routed_streaming_moves_the_right_kv(dp, tp_p, dt, tp_t):
    g = torch.Generator().manual_seed(dp * 100 + dt * 10 + tp_t)
    full = torch.randn(LAYERS, 10, 2, BS, HEADS, HD, generator=g)
    request = [2, 7, 4]  # the request's blocks on the prompt side (global numbering here)
    senders, receivers = layouts("p", LAYERS, dp, tp_p), layouts("t", LAYERS, dt, tp_t)
    transfers = plan(senders, receivers, HEADS)
    hub = HostMemoryDest()  # every worker's destination is the same host store in this test
    for w in senders:
        cache = shard(full, w, {b: b for b in range(10)}, 10)
        routed.stream_out(KVStreamer(cache), transfers, w.worker, request, {r.worker: hub for r in receivers},
                          "req9").wait(10)
    recv_blocks = [11, 0, 5]  # where the token side put the request
    for w in receivers:
        h0, h1 = w.heads(HEADS)
        cache = PagedKVCache(w.layer_end - w.layer_start, 12, BS, h1 - h0, HD, torch.float32, torch.device("cpu"))
        routed.stream_in(KVStreamer(cache), transfers, w.worker, recv_blocks, {s.worker: hub for s in senders},
                         "req9").wait(10)
        for src_b, dst_b in zip(request, recv_blocks):
            assert torch.equal(cache.tensor[:, dst_b], full[w.layer_start:w.layer_end, src_b, :, :, h0:h1])
        others = [b for b in range(12) if b not in recv_blocks]
        assert not cache.tensor[:, others].any()
