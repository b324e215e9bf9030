"""Microbatch swapping: the device cache holds `resident` microbatches, the host all of them; outputs
equal the single-process engine's; the device side never exceeds its budget."""
from __future__ import annotations

import random

import pytest
import torch

from dejavu import LLM, SamplingParams
from dejavu.engine.swap import SwapCache, SwapError

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _workload(n, seed, max_prompt=40, max_out=24):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 1000) for _ in range(rng.randrange(2, max_prompt))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(1, max_out), ignore_eos=True) for _ in prompts]
    return prompts, params


def _reference(model, prompts, params, device="cpu"):
    llm = LLM(model=model, device=device, dtype="float32")
    try:
        return [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("model,pp,resident", [("random:opt-tiny", 2, 1), ("random:opt-tiny", 2, 2),
                                               ("random:llama-tiny", 4, 2)])
def test_swapping_gives_the_same_tokens(model, pp, resident):
    """Mixed lengths, small microbatches (requests join and finish), greedy and seeded sampling."""
    prompts, params = _workload(12, seed=pp + resident)
    params[3] = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    want = _reference(model, prompts, params)
    llm = LLM(device="cpu", model=model, pp=pp, swap=True, resident_microbatches=resident, microbatch_size=3, kv_cache_blocks=12)
    try:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        eng = llm.engine
        assert eng.device_blocks == 12 // resident * resident and eng.host_blocks == eng.region_blocks * pp
        stats = list(eng.swap_stats.values())
    finally:
        llm.shutdown()
    assert got == want
    assert stats and all(s["bytes_out"] > 0 for s in stats)
    if resident < pp:  # microbatches really left the device and came back
        assert any(s["bytes_in"] > 0 for s in stats)


@pytest.mark.parametrize("device,transport", [("cpu", "shm"), pytest.param("cuda", "auto", marks=_CUDA)])
def test_swapping_on_the_token_side_of_disaggregation(device, transport):
    """Prompt workers prefill, swapping token workers decode (2 token microbatches, 1 resident):
    the prompt KV lands in the token workers' host copies and is swapped in for its steps. Mixed
    lengths, requests joining and finishing; the same tokens as one process (fp32)."""
    prompts, params = _workload(12, seed=5)
    want = _reference("random:llama-tiny", prompts, params, device=device)
    llm = LLM(model="random:llama-tiny", device=device, dtype="float32", prompt_stages=1, token_stages=2, swap=True,
              resident_microbatches=1, microbatch_size=3, kv_cache_blocks=12, kv_transport=transport)
    try:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        eng = llm.engine
        assert eng.device_blocks == 12 and eng.host_blocks == 24 and eng.transports_used <= {"shm", "tcp"}
        stats = list(eng.swap_stats.values())
    finally:
        llm.shutdown()
    assert got == want
    assert stats and all(s["bytes_in"] > 0 for s in stats)  # microbatches left the device and came back


def test_swapping_stress_many_microbatches():
    prompts, params = _workload(28, seed=11, max_prompt=60, max_out=30)
    want = _reference("random:llama-tiny", prompts, params)
    llm = LLM(device="cpu", model="random:llama-tiny", pp=4, swap=True, resident_microbatches=1, microbatch_size=2,
              kv_cache_blocks=10)
    try:
        got = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
    assert got == want


def test_swapping_holds_more_than_the_device_budget():
    """pp=2 with one resident microbatch: twice the device budget's blocks are in use at once."""
    llm = LLM(device="cpu", model="random:opt-tiny", pp=2, swap=True, resident_microbatches=1, microbatch_size=2,
              kv_cache_blocks=8, block_size=4)
    try:
        eng = llm.engine
        prompts = [[11 + i] * 25 for i in range(4)]  # 7 blocks each at the end: a microbatch of 1 per region
        outs = llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))
        assert all(len(o.token_ids) == 3 for o in outs)
        assert eng.host_blocks == 16 and eng.device_blocks == 8
        from dejavu.serving.async_engine import AsyncEngine

        ae = AsyncEngine(eng)
        try:
            text = ae.metrics.render()
        finally:
            ae.shutdown()
        assert "dejavu_kv_blocks_total 16" in text
        assert 'dejavu_kv_bytes_streamed_total{kind="swap_out"}' in text
        from dejavu.engine.llm_engine import RequestError

        with pytest.raises(RequestError, match="holds only 8"):
            llm.generate([[5] * 40], SamplingParams(max_tokens=1))
    finally:
        llm.shutdown()


# The CPU copier thread, and on CUDA copy-engine copies (the default) and the span-copy kernel.
COPIES = [("cpu", None), pytest.param("cuda", "dma", marks=_CUDA), pytest.param("cuda", "kernel", marks=_CUDA)]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device,copy", COPIES)
def test_swap_cache_keeps_host_copy_current_and_budget(device, copy):
    L, bs, kvh, hd = 2, 4, 2, 8
    dev = torch.zeros((L, 6, 2, bs, kvh, hd), device=device)
    sw = SwapCache(dev, host_blocks=12, resident=2, copy=copy)
    assert sw.region_blocks == 3
    rng = random.Random(0)
    truth = {}
    owner = {mb: list(range(mb * 3, mb * 3 + 3)) for mb in range(4)}  # 4 microbatches, 3 blocks each
    for step in range(40):
        mb = rng.randrange(4)
        live = owner[mb][: rng.randrange(1, 4)]
        sw.prefetch(mb, live)
        mapping = sw.acquire(mb, live)
        assert set(mapping) == set(live) and all(0 <= d < 6 for d in mapping.values())
        region = next(r for r in sw.regions if r.mb == mb)
        assert all(region.index * 3 <= d < region.index * 3 + 3 for d in mapping.values())
        for b in live:  # what was written before came back in
            if b in truth:
                assert torch.equal(dev[:, mapping[b]], truth[b])
        b = rng.choice(live)
        dev[:, mapping[b]] = torch.randn_like(dev[:, 0])
        truth[b] = dev[:, mapping[b]].clone()
        sw.write_back(mapping, [b])
        _sync(device)
        assert torch.equal(sw.host[:, b], truth[b].cpu())
    assert sw.bytes_in > 0 and sw.bytes_out == 40 * sw.block_bytes
    with pytest.raises(SwapError, match="budget was exceeded"):
        sw.acquire(0, list(range(4)))
    sw.close()


@pytest.mark.parametrize("device,copy", COPIES)
def test_swap_ins_are_double_buffered_in_pipeline_order(device, copy):
    """4 microbatches over 2 resident regions, steps in arrival order: every step's swap-in was
    started before the step (while the one before it ran), none at acquire time, and no queued
    microbatch's region is taken by one behind it. With DMA a microbatch's 3 consecutive blocks
    land in 3 consecutive device blocks: one copy per swap-in."""
    L, bs, kvh, hd = 2, 4, 2, 8
    dev = torch.zeros((L, 6, 2, bs, kvh, hd), device=device)
    sw = SwapCache(dev, host_blocks=12, resident=2, copy=copy)
    owner = {mb: list(range(mb * 3, mb * 3 + 3)) for mb in range(4)}
    for b in range(12):
        sw.host[:, b] = b
    for mb in range(4):  # the pipeline's first round: every step message arrives at once
        sw.prefetch(mb, owner[mb])
    assert [r.mb for r in sw.regions] == [0, 1]
    for step in range(16):
        mb = step % 4
        before = sw.bytes_in
        mapping = sw.acquire(mb, owner[mb])
        assert sw.bytes_in == before, f"step {step}: microbatch {mb} was swapped in on demand"
        assert all(torch.equal(dev[:, mapping[b]], torch.full_like(dev[:, 0], b)) for b in owner[mb])
        assert sorted(mapping[b] for b in owner[mb]) == [mapping[b] for b in owner[mb]]  # ascending
        sw.write_back(mapping, [])
        assert sorted(r.mb for r in sw.regions) == sorted([(mb + 1) % 4, (mb + 2) % 4])
        sw.prefetch(mb, owner[mb])  # its next step arrives after this one ended
    assert sw.bytes_in == (16 + 2) * 3 * sw.block_bytes  # once per step, and the next two are already in
    if copy == "dma":
        assert sw.copies == 16 + 2
    sw.close()


def test_swap_errors_are_clear():
    with pytest.raises(ValueError, match="swap: needs a pipeline of pp >= 2"):
        LLM(device="cpu", model="random:opt-tiny", swap=True)
    with pytest.raises(ValueError, match="token_stages >= 2 with disaggregation"):
        LLM(device="cpu", model="random:opt-tiny", swap=True, prompt_stages=1, token_stages=1)
    with pytest.raises(ValueError, match="needs kv_transport shm or tcp"):
        LLM(device="cpu", model="random:opt-tiny", swap=True, prompt_stages=1, token_stages=2, kv_transport="ipc")
    with pytest.raises(ValueError, match="resident_microbatches: must be an integer >= 1"):
        LLM(device="cpu", model="random:opt-tiny", pp=2, swap=True, resident_microbatches=0)
    with pytest.raises(SwapError, match="unknown swap copy 'pcie'"):
        SwapCache(torch.zeros((1, 2, 2, 4, 1, 8)), host_blocks=4, resident=1, copy="pcie")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("pp,resident", [(2, 1), (4, 2)])
def test_swapping_on_cuda_gives_the_same_tokens(pp, resident):
    """The CUDA path (copy-engine copies to and from pinned host memory on the swap stream), fp32."""
    prompts, params = _workload(12, seed=pp)
    ref = LLM(model="random:llama-tiny", device="cuda", dtype="float32")
    try:
        want = [o.token_ids for o in ref.generate(prompts, params)]
    finally:
        ref.shutdown()
    llm = LLM(model="random:llama-tiny", device="cuda", dtype="float32", pp=pp, swap=True,
              resident_microbatches=resident, microbatch_size=3, kv_cache_blocks=12)
    try:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        stats = list(llm.engine.swap_stats.values())
    finally:
        llm.shutdown()
    assert got == want
    assert any(s["bytes_in"] > 0 for s in stats)



@_CUDA
def test_dma_block_copies():
    """Copy-engine block copies, both directions: exactly the blocks asked for land, one copy per
    run of consecutive ids."""
    from dejavu import _C

    L, host_blocks, dev_blocks = 5, 20, 9
    host = torch.randn(L, host_blocks, 2, 4, 2, 8).pin_memory()
    dev = torch.zeros(L, dev_blocks, 2, 4, 2, 8, device="cuda")
    chunk = host[0, 0].numel() * host.element_size()
    src, dst = [3, 4, 5, 6, 10, 11, 0], [0, 1, 2, 3, 5, 6, 8]  # runs of 4, 2 and 1 blocks
    stream = torch.cuda.current_stream().cuda_stream
    n = _C.cuda_dma_copy_blocks(host.data_ptr(), dev.data_ptr(), src, dst, L, host_blocks, dev_blocks, chunk, stream)
    torch.cuda.synchronize()
    want = torch.zeros(dev.shape)
    want[:, dst] = host[:, src]
    assert n == 3 and torch.equal(dev.cpu(), want)
    back = torch.zeros_like(host).pin_memory()
    _C.cuda_dma_copy_blocks(dev.data_ptr(), back.data_ptr(), dst, src, L, dev_blocks, host_blocks, chunk, stream)
    torch.cuda.synchronize()
    assert torch.equal(back[:, src], host[:, src]) and not back[:, [1, 2, 7]].any()
    with pytest.raises(ValueError, match="past the end"):
        _C.cuda_dma_copy_blocks(host.data_ptr(), dev.data_ptr(), [19], [9], L, host_blocks, dev_blocks, chunk, stream)
