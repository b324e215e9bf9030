"""The prefix cache's host and disk tiers: blocks the device evicts come back exact from pinned
host memory and from checksummed files; a corrupted file is detected and its block recomputed."""
from __future__ import annotations

import os
import random

import pytest
import torch

from dejavu import LLM, SamplingParams
from dejavu.kvstream.tiers import DiskTier, HostTier
from conftest import needs_cuda
from hf_models import hf_greedy, save_hf_model

BS = 4
NEW = 6
BLOCK = 2 * 2 * BS * 2 * 16 * 4  # tiny llama: layers x (K, V) x block x kv heads x head_dim x fp32


def _block(v: int, n: int = 64) -> torch.Tensor:
    return torch.full((n,), v, dtype=torch.uint8)


def test_host_tier_lru_spills_to_disk_and_keeps_wanted(tmp_path):
    disk = DiskTier(str(tmp_path), 3 * (64 + 20), 64)
    host = HostTier(2 * 64, 64, spill=disk, pin=False)
    for i in range(3):
        host.reserve(bytes([i]) * 16).copy_(_block(i))
    assert bytes([0]) * 16 not in host and bytes([0]) * 16 in disk  # pushed out to disk, oldest first
    host.get(bytes([1]) * 16)  # now the most recent: 2 goes next
    host.reserve(b"k" * 16, keep=frozenset()).copy_(_block(9))
    assert bytes([2]) * 16 in disk and bytes([1]) * 16 in host
    # Every entry wanted: nothing is pushed out, the new block is not kept.
    assert host.reserve(b"x" * 16, keep=frozenset(host.entries)) is None
    out = torch.empty(64, dtype=torch.uint8)
    assert disk.get(bytes([0]) * 16, out) and torch.equal(out, _block(0))
    # Bounded: a fourth file drops the least recently used one.
    disk.put(b"y" * 16, _block(5))
    disk.put(b"z" * 16, _block(6))
    assert len(disk) == 3 and len(os.listdir(tmp_path)) == 3
    # Indexed again by a new process's tier.
    again = DiskTier(str(tmp_path), 3 * (64 + 20), 64)
    assert set(again.entries) == set(disk.entries)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_disk_tier_refuses_a_damaged_block(tmp_path, damage):
    disk = DiskTier(str(tmp_path), 1 << 20, 64)
    disk.put(b"a" * 16, _block(3))
    path = disk.path(b"a" * 16)
    raw = bytearray(open(path, "rb").read())
    if damage == "flip":
        raw[-1] ^= 1
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw[0] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    assert not disk.get(b"a" * 16, torch.empty(64, dtype=torch.uint8))
    assert disk.corrupt == 1 and b"a" * 16 not in disk and not os.path.exists(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return save_hf_model("llama", path), str(path)


def _workload(vocab):
    r = random.Random(7)
    system = [r.randrange(3, vocab) for _ in range(14)]
    shared = [system + [r.randrange(3, vocab) for _ in range(k)] for k in (1, 3)]
    others = [[r.randrange(3, vocab) for _ in range(22)] for _ in range(4)]
    return shared, others


def _run(llm, hf, prompts):
    sp = SamplingParams(max_tokens=NEW, ignore_eos=True)
    for p in prompts:
        assert llm.generate([p], sp)[0].token_ids == hf_greedy(hf, p, NEW)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_host_tier_hits_are_exact(llama, device):
    hf, path = llama
    shared, others = _workload(hf.config.vocab_size)
    llm = LLM(device=device, model=path, block_size=BS, dtype="float32", kv_cache_blocks=12,
              enable_prefix_caching=True, kv_offload_gib=64 * BLOCK / 2**30)
    assert llm.engine.tiers.block_bytes == BLOCK
    _run(llm, hf, shared[:1] + others + shared[1:])  # the others push the shared blocks off the device
    st = llm.engine.prefix_cache_stats()
    assert st["evictions"] > 0 and st["host_hit_tokens"] >= 3 * BS and st["host_blocks"] > 0
    assert llm.engine.cache.allocator.num_used == 0


def test_disk_tier_hits_are_exact_and_a_corrupted_block_is_recomputed(llama, tmp_path):
    hf, path = llama
    shared, others = _workload(hf.config.vocab_size)
    kw = dict(device="cpu", model=path, block_size=BS, dtype="float32", kv_cache_blocks=12,
              enable_prefix_caching=True, kv_offload_gib=2 * BLOCK / 2**30, kv_offload_dir=str(tmp_path))
    llm = LLM(**kw)
    _run(llm, hf, shared[:1] + others + shared[1:])
    st = llm.engine.prefix_cache_stats()
    assert st["disk_hit_tokens"] >= 2 * BS, st
    # A new engine finds the files; damage every one of them: each is detected, none used.
    files = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    assert files
    for f in files:
        raw = bytearray(open(f, "rb").read())
        raw[len(raw) // 2] ^= 0x55
        open(f, "wb").write(bytes(raw))
    fresh = LLM(**kw)
    _run(fresh, hf, shared)
    st = fresh.engine.prefix_cache_stats()
    assert st["disk_corrupt"] >= 1 and st["disk_hit_tokens"] == 0, st


def test_offload_options_are_checked():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(model="random:llama-tiny", device="cpu", enable_prefix_caching=False, kv_offload_gib=1)
    with pytest.raises(ValueError, match="kv_offload_gib"):
        LLM(model="random:llama-tiny", device="cpu", enable_prefix_caching=True, kv_offload_dir="/tmp/x")
    with pytest.raises(ValueError, match="kv_offload_gib"):
        LLM(model="random:llama-tiny", device="cpu", enable_prefix_caching=True, kv_offload_gib=-1)


def test_metrics_show_hits_per_tier(llama):
    from dejavu.serving.async_engine import AsyncEngine

    hf, path = llama
    shared, others = _workload(hf.config.vocab_size)
    llm = LLM(device="cpu", model=path, block_size=BS, dtype="float32", kv_cache_blocks=12,
              enable_prefix_caching=True, kv_offload_gib=64 * BLOCK / 2**30)
    _run(llm, hf, shared[:1] + others + shared[1:])
    ae = AsyncEngine(llm.engine)
    try:
        text = ae.metrics.render()
    finally:
        ae.shutdown()
    st = llm.engine.prefix_cache_stats()
    assert f'dejavu_prefix_cache_hit_tokens_total{{tier="host"}} {st["host_hit_tokens"]}' in text
    assert f'dejavu_prefix_cache_hit_tokens_total{{tier="device"}} {st["device_hit_tokens"]}' in text
    assert f"dejavu_prefix_cache_evictions_total {st['evictions']}" in text
    assert f'dejavu_kv_bytes_streamed_total{{kind="prefix_restore"}} {st["restored_bytes"]}' in text
    assert st["restored_bytes"] == st["host_hit_tokens"] // BS * BLOCK > 0


def test_cluster_and_metrics_show_each_tiers_size_and_occupancy(llama, tmp_path):
    import json
    import urllib.request

    from dejavu.serving.api import ApiServer

    hf, path = llama
    shared, others = _workload(hf.config.vocab_size)
    llm = LLM(device="cpu", model=path, block_size=BS, dtype="float32", kv_cache_blocks=12,
              enable_prefix_caching=True, kv_offload_gib=2 * BLOCK / 2**30, kv_offload_dir=str(tmp_path))
    srv = ApiServer(llm, "m")
    port = srv.start_background()
    try:
        for p in shared[:1] + others:  # fills the device, pushes blocks to the host and the disk
            body = json.dumps({"prompt": p, "max_tokens": 2, "ignore_eos": True}).encode()
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                                          {"Content-Type": "application/json"}), timeout=60).read()
        tiers = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/cluster", timeout=10).read())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        srv.stop()
    tiers = tiers["prefix_cache"]
    assert tiers["device"]["capacity_blocks"] == 12 and 0 < tiers["device"]["blocks"] <= 12
    assert tiers["host"] == {"blocks": 2, "capacity_blocks": 2}
    assert tiers["disk"]["blocks"] == len(os.listdir(tmp_path)) > 0
    for t, v in tiers.items():
        assert f'dejavu_prefix_cache_blocks{{tier="{t}"}} {v["blocks"]}' in text
        assert f'dejavu_prefix_cache_capacity_blocks{{tier="{t}"}} {v["capacity_blocks"]}' in text


def test_restored_blocks_under_pressure_are_exact(llama):
    """Host hits restored into device blocks while a batch decodes in a cache too small for it:
    restored blocks of preempted sequences are reused by others, readmissions restore them again."""
    hf, path = llama
    shared, others = _workload(hf.config.vocab_size)
    llm = LLM(device="cpu", model=path, block_size=BS, dtype="float32", kv_cache_blocks=14,
              enable_prefix_caching=True, kv_offload_gib=64 * BLOCK / 2**30)
    _run(llm, hf, shared[:1] + others)  # the shared prefix now lives on the host only
    prompts = [shared[0][:14] + [t] * k for t, k in ((5, 1), (6, 3), (7, 2), (8, 5))]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, sp)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 12)
    st = llm.engine.prefix_cache_stats()
    assert st["host_hit_tokens"] >= 3 * BS and llm.engine.scheduler.num_preemptions > 0, st
    assert llm.engine.cache.allocator.num_used == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("groups", [4, 2])
def test_restores_are_copies_per_group_of_layers_waited_for_layer_by_layer(groups, device, monkeypatch):
    """The restore's copies per group of layers land each layer's bytes of each block where it was
    (the CPU twin of the CUDA path's per-group events); a step waits for a group at its first layer."""
    from dejavu.engine.block_manager import PrefixStats
    from dejavu.engine.kv_cache import PagedKVCache
    from dejavu.engine.prefix_tiers import PrefixTiers

    monkeypatch.setattr(PrefixTiers, "GROUPS", groups)
    cache = PagedKVCache(3, 8, BS, 2, 16, torch.float32, torch.device(device))
    cache.tensor.copy_(torch.randn_like(cache.tensor))
    before = cache.tensor.clone()
    tiers = PrefixTiers(cache, PrefixStats(), 1 << 20)
    names = [bytes([i]) * 16 for i in range(3)]
    tiers.apply(list(zip([1, 4, 6], names)), [])  # offload blocks 1, 4, 6
    cache.tensor.zero_()
    counts = tiers.apply([], [list(zip([2, 3], names[:2])), [(7, names[2])]], overlap=True)
    assert counts == [2, 1] and [a for a, _ in tiers.pending] == ([0, 1, 2] if groups == 4 else [0, 1])
    for layer in range(3):
        tiers.wait_layer(layer)
        for dst, src in ((2, 1), (3, 4), (7, 6)):
            assert torch.equal(cache.tensor[layer, dst], before[layer, src])
    tiers.wait_pending()
    assert tiers.pending is None and not cache.tensor[:, [0, 1, 4, 5, 6]].any()
