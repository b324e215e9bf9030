"""Prefix caching in the distributed modes, over real worker processes: greedy and seeded tokens
equal a single process without caching, with a worker killed (SIGKILL) while requests share blocks."""
from __future__ import annotations

import os
import random
import signal
import time

from conftest import alive
from dejavu import LLM, SamplingParams
from dejavu.engine.block_manager import block_hashes, blocks_for, root_hash

MODEL = "random:llama-tiny"
BS = 4


def _workload(seed: int = 7):
    """Prompts sharing a 13-token system prompt (three full blocks and one token), greedy and seeded."""
    r = random.Random(seed)
    system = [r.randrange(3, 500) for _ in range(13)]
    prompts = [system + [r.randrange(3, 500) for _ in range(k)] for k in (0, 2, 5, 9, 1, 6)]
    params = [SamplingParams(max_tokens=30, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8, top_k=20, seed=3 + i)
              for i in range(len(prompts))]
    return prompts, params


def _reference(prompts, params):
    with LLM(model=MODEL, device="cpu", block_size=BS) as llm:
        return [o.token_ids for o in llm.generate(prompts, params)]


def _run_with_kill(llm, prompts, params, at_step: int, rank: int):
    """Two requests first, the rest two steps later (they hit the blocks the first ones fill); the
    worker of `rank` is killed after `at_step` steps."""
    eng = llm.engine
    seqs = [eng.add_request(p, sp) for p, sp in zip(prompts[:2], params[:2])]
    steps, killed = 0, None
    while eng.has_unfinished() or steps < 2:
        if steps == 2:
            seqs += [eng.add_request(p, sp) for p, sp in zip(prompts[2:], params[2:])]
        if steps == at_step:
            killed = eng.worker_info[rank]["pid"]
            os.kill(killed, signal.SIGKILL)
        eng.step()
        steps += 1
    return [s.output_ids for s in seqs], killed


def _close(llm, killed):
    procs = list(llm.engine.procs)
    llm.shutdown()
    if killed is not None and alive(killed):
        os.kill(killed, signal.SIGKILL)
    time.sleep(0.2)
    assert not any(alive(p.pid) for p in procs), "a worker outlived the engine"


def test_replicated_pipeline_with_shared_blocks_survives_a_kill():
    """pp=2 --replicate: shared blocks are replicated once (by the request that computed them) and a
    replacement restores them once; every stream stays exact and the replicas are used."""
    prompts, params = _workload()
    ref = _reference(prompts, params)
    for at_step, rank in ((9, 0), (5, 1)):
        llm = LLM(model=MODEL, device="cpu", pp=2, block_size=BS, kv_cache_blocks=128, worker_timeout=60,
                  replicate=True, enable_prefix_caching=True)
        killed = None
        try:
            eng = llm.engine
            # a finished request leaves the system prompt's blocks named (and replicated) for the run
            assert llm.generate([prompts[0]], params[0])[0].token_ids == ref[0]
            hit0 = eng.allocator.stats.device_hit_tokens
            got, killed = _run_with_kill(llm, prompts, params, at_step, rank)
            assert got == ref, (at_step, rank)
            assert eng.allocator.stats.device_hit_tokens - hit0 >= 3 * BS * (len(prompts) - 1)
            ft = eng.fault_tolerance()
            ev = ft["recoveries"][0]
            assert ft["failures"] == 1 and ev["workers"] == [f"s{rank}.0"] and ev["bad_replicas"] == 0
            # resumed from the replicas' watermarks, not from the prompts
            assert ev["recomputed_tokens"] < sum(len(p) for p in prompts), ev
            assert eng.allocator.num_used == 0
            # after the recovery the cache fills again and hits stay exact
            before = eng.allocator.stats.device_hit_tokens
            assert [o.token_ids for o in llm.generate(prompts[:1], params[:1])] == ref[:1]
            assert llm.generate([prompts[2]], params[2])[0].token_ids == ref[2]
            assert eng.allocator.stats.device_hit_tokens > before
        finally:
            _close(llm, killed)


def test_resuming_replication_forgets_blocks_computed_while_paused():
    """Blocks computed with replication paused have no replica: nothing may share them after it resumes."""
    prompts, params = _workload(seed=8)
    with LLM(model=MODEL, device="cpu", pp=2, block_size=BS, kv_cache_blocks=64, worker_timeout=60,
             replicate=True, enable_prefix_caching=True) as llm:
        eng = llm.engine
        eng.set_replication(False)
        llm.generate(prompts[:1], params[:1])
        names = block_hashes(prompts[1], BS, root_hash(eng.prefix_salt), 0, 3)
        assert len(eng.allocator.lookup(names)) == 3
        eng.set_replication(True)
        assert eng.allocator.lookup(names) == []


def test_disaggregated_prompt_side_skips_its_cached_prefix_and_sends_only_missing_blocks():
    """prompt_stages=1, token_stages=2: the prefill starts after the prompt side's hits, and the token
    side receives only the blocks it lacks; tokens equal a single process without caching."""
    prompts, params = _workload(seed=9)
    ref = _reference(prompts, params)
    with LLM(model=MODEL, device="cpu", prompt_stages=1, token_stages=2, block_size=BS, kv_cache_blocks=96,
             worker_timeout=60, enable_prefix_caching=True) as llm:
        eng = llm.engine
        assert [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)] == ref
        # every later prompt hits the system prompt's three blocks on both sides ...
        want = 3 * BS * (len(prompts) - 1)
        assert eng.prompt_alloc.stats.device_hit_tokens >= want and eng.allocator.stats.device_hit_tokens >= want
        # ... and the token side receives only the blocks after them
        sent = [st["bytes"] for st in eng.transfer_stats]
        per_block = sent[0] // blocks_for(len(prompts[0]), BS)
        assert sent[1:] == [(blocks_for(len(p), BS) - 3) * per_block for p in prompts[1:]]
        # all at once (racing for the same blocks) from a warm cache
        assert [o.token_ids for o in llm.generate(prompts, params)] == ref
        assert eng.allocator.num_used == 0 and eng.prompt_alloc.num_used == 0
        # /v1/cluster and /metrics: the prompt side's counters; named blocks of both sides
        assert eng.prefix_cache_stats()["device_hit_tokens"] == eng.prompt_alloc.stats.device_hit_tokens >= want
        named = eng.prompt_alloc.num_named + eng.allocator.num_named
        assert eng.prefix_cache_tiers()["device"] == {"blocks": named,
                                                      "capacity_blocks": eng.num_prompt_blocks + eng.num_blocks}


def test_swapping_pipeline_shares_blocks_within_a_microbatch():
    """pp=2 --swap, one resident microbatch: each microbatch slot names its own logical blocks (kept
    current in the workers' host copies), so a hit is swapped in like any live block, once."""
    prompts, params = _workload(seed=10)
    ref = _reference(prompts, params)
    with LLM(model=MODEL, device="cpu", pp=2, swap=True, resident_microbatches=1, microbatch_size=2, block_size=BS,
             kv_cache_blocks=24, worker_timeout=60, enable_prefix_caching=True) as llm:
        eng = llm.engine
        for _ in range(2):
            assert [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)] == ref
            assert [o.token_ids for o in llm.generate(prompts, params)] == ref
        allocs = [s.allocator for s in eng.slots]
        assert len({id(a) for a in allocs}) == 2
        assert sum(a.stats.device_hit_tokens for a in allocs) >= 3 * BS * len(prompts)
        assert all(a.num_used == 0 for a in allocs)
        # /v1/cluster and /metrics count every slot's blocks and hits, not the first slot's
        assert eng.prefix_cache_stats()["device_hit_tokens"] == sum(a.stats.device_hit_tokens for a in allocs)
        assert eng.prefix_cache_tiers()["device"] == {"blocks": sum(a.num_named for a in allocs),
                                                      "capacity_blocks": eng.host_blocks}
        assert all(a.stats.device_hit_tokens > 0 for a in allocs)
