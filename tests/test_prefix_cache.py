"""Prefix caching: block names, shared reference-counted blocks, LRU reuse of freed named blocks,
and greedy tokens with caching on identical to HF (fp32, CPU) in every sharing pattern."""
from __future__ import annotations

import random

import pytest

from dejavu import LLM, SamplingParams
from dejavu.engine.block_manager import BlockAllocator, OutOfBlocks, block_hashes, root_hash
from dejavu.engine.scheduler import Scheduler
from dejavu.engine.sequence import Sequence
from hf_models import hf_greedy, save_hf_model

BS = 4
NEW = 8


def test_names_chain_their_parent_and_salt():
    ids = list(range(10, 22))
    a = block_hashes(ids, BS, root_hash("m"), 0, 3)
    assert len(set(a)) == 3
    assert block_hashes(ids, BS, root_hash("m"), 0, 3) == a  # stable
    assert block_hashes(ids, BS, root_hash("other"), 0, 3)[0] != a[0]  # the salt names the model
    assert block_hashes(ids, BS, a[0], 1, 3) == a[1:]  # resumable from any block
    # The same tokens after a different first block get a different name.
    assert block_hashes([9] + ids[1:], BS, root_hash("m"), 0, 3)[1] != a[1]


def test_allocator_refcounts_and_reuses_named_blocks_last_in_lru_order():
    al = BlockAllocator(4)
    al.record_evictions = True
    x, y, z, w = al.allocate(4)
    for b, name in ((x, b"x"), (y, b"y"), (z, b"z")):
        assert al.register(b, name)
    assert not al.register(w, b"x")  # the name is taken: w stays unnamed
    al.acquire([x])  # a second sequence shares x
    assert al.num_used == 4
    al.free([x, y, z, w])
    assert al.num_used == 1 and al.num_free == 3  # x is still held once
    assert al.lookup([b"x", b"y", b"z", b"q"]) == [x, y, z]
    # Unnamed blocks go first, then named ones oldest-freed first; names of reused blocks are dropped.
    assert al.allocate(2) == [w, y]
    assert al.take_evicted() == [(y, b"y")] and al.stats.evictions == 1
    assert al.lookup([b"x", b"y"]) == [x]
    al.free([x])
    assert al.lookup([b"z"]) == [z]
    al.acquire([z])  # a cached free block taken back from the free list
    assert al.num_free == 1
    with pytest.raises(ValueError):
        al.free([123])
    with pytest.raises(OutOfBlocks):
        al.allocate(2)


def test_admission_counts_shared_blocks_once():
    """Two sequences sharing a cached 2-block prefix fit where two private copies would not."""
    al = BlockAllocator(5)
    sch = Scheduler(al, BS, max_num_seqs=8, max_num_batched_tokens=4096, prefix_salt="m")
    first = Sequence(list(range(1, 10)), SamplingParams(max_tokens=2), seed=0)  # 9 tokens: 3 blocks
    sch.add(first)
    assert sch.schedule()[0] == [first]
    first.num_cached = len(first)  # as the model runner marks it after the prefill
    sch.finish(first, "stop")
    second = Sequence(list(range(1, 9)) + [50, 51, 52, 53], SamplingParams(max_tokens=1), seed=0)
    third = Sequence(list(range(1, 9)) + [60], SamplingParams(max_tokens=1), seed=0)
    sch.add(second)
    sch.add(third)
    batch, prefill = sch.schedule()
    assert prefill and batch == [second, third]
    assert second.block_table[:2] == third.block_table[:2]  # the shared prefix, once
    assert second.num_cached == third.num_cached == 2 * BS
    assert al.num_used == 4  # two private copies would need 6 of the 5 blocks
    assert al.stats.device_hit_tokens == 4 * BS


def test_a_burst_computes_a_shared_prefix_once_and_hits_are_not_held_back_by_long_prefills():
    al = BlockAllocator(64)
    sch = Scheduler(al, BS, max_num_seqs=8, max_num_batched_tokens=4096, prefix_salt="m")
    sp = SamplingParams(max_tokens=2)
    burst = [Sequence(list(range(1, 13)) + [40 + i], sp, seed=0) for i in range(3)]  # 3 shared blocks
    for s in burst:
        sch.add(s)
    assert sch.schedule() == ([burst[0]], True)  # the others would compute the same blocks: next step
    burst[0].num_cached = len(burst[0])
    assert sch.schedule() == (burst[1:], True)
    assert [s.num_cached for s in burst[1:]] == [3 * BS, 3 * BS] and al.stats.device_hit_tokens == 6 * BS
    # A hit then a long unshared prompt: the hit's first token does not wait for the long prefill.
    for s in burst[1:]:
        s.num_cached = len(s)
    hit, long = Sequence(list(range(1, 13)) + [99], sp, seed=0), Sequence(list(range(200, 240)), sp, seed=0)
    sch.add(hit)
    sch.add(long)
    assert sch.schedule() == ([hit], True)
    hit.num_cached = len(hit)
    assert sch.schedule() == ([long], True)


def _prompts(vocab: int, seed: int = 0):
    r = random.Random(seed)
    system = [r.randrange(3, vocab) for _ in range(10)]  # ends inside the third block

    def tail(k):
        return [r.randrange(3, vocab) for _ in range(k)]
    return [system + tail(k) for k in (0, 1, 2, 3, 5, 9)] + [system[:3] + tail(4), system[:8]]


@pytest.fixture(scope="module", params=["llama", "opt", "bloom"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, path)
    return hf, str(path)


def _llm(path, **kw):
    return LLM(device="cpu", model=path, block_size=BS, dtype="float32", enable_prefix_caching=True, **kw)


def test_shared_prefixes_hit_and_match_hf(model):
    hf, path = model
    ps = _prompts(hf.config.vocab_size)
    expect = [hf_greedy(hf, p, NEW) for p in ps]
    llm = _llm(path)
    sp = SamplingParams(max_tokens=NEW, ignore_eos=True)
    # All at once: the first computes the shared blocks, the others are admitted a step later and hit.
    assert [o.token_ids for o in llm.generate(ps, sp)] == expect
    stats = llm.engine.cache.allocator.stats
    assert stats.hit_tokens == 5 * 2 * BS + BS  # five hit the system prompt's 2 full blocks, system[:8] one
    hits = stats.device_hit_tokens
    # One by one: each finds what the earlier ones (and the first round) left.
    for p, e in zip(ps, expect):
        assert llm.generate([p], sp)[0].token_ids == e
    assert stats.device_hit_tokens - hits >= 2 * BS * (len(ps) - 2)
    assert llm.engine.cache.allocator.num_used == 0


def test_multi_turn_reuses_decoded_blocks(model):
    """The next turn's prompt is the last prompt + its answer + more: blocks filled while decoding hit."""
    hf, path = model
    llm = _llm(path)
    sp = SamplingParams(max_tokens=NEW, ignore_eos=True)
    prompt = _prompts(hf.config.vocab_size, seed=1)[3]
    stats = llm.engine.cache.allocator.stats
    computed = 0  # tokens of the previous turn whose K/V was computed (all but its last)
    for turn in range(3):
        before = stats.device_hit_tokens
        out = llm.generate([prompt], sp)[0].token_ids
        assert out == hf_greedy(hf, prompt, NEW), f"turn {turn}"
        assert stats.device_hit_tokens - before == min(len(prompt) - 1, computed) // BS * BS
        computed = len(prompt) + NEW - 1
        prompt = prompt + out + [7, 8, 9]
    assert computed >= 3 * BS


def test_eviction_under_block_pressure_stays_exact(model):
    """A cache of 14 blocks: named blocks are reused (evicted) and requests preempted, again and again."""
    hf, path = model
    ps = _prompts(hf.config.vocab_size, seed=2)
    expect = [hf_greedy(hf, p, NEW) for p in ps]
    llm = _llm(path, kv_cache_blocks=14)
    sp = SamplingParams(max_tokens=NEW, ignore_eos=True)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(ps, sp)] == expect
        for p, e in zip(reversed(ps), reversed(expect)):
            assert llm.generate([p], sp)[0].token_ids == e
    al = llm.engine.cache.allocator
    assert al.stats.evictions > 0 and al.stats.device_hit_tokens > 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert al.num_used == 0 and al.promised == 0


def test_reserve_admission_with_shared_blocks(model):
    hf, path = model
    ps = _prompts(hf.config.vocab_size, seed=3)
    llm = _llm(path, kv_cache_blocks=16, admission="reserve")
    sp = SamplingParams(max_tokens=NEW, ignore_eos=True)
    llm.generate(ps[:1], sp)
    assert [o.token_ids for o in llm.generate(ps, sp)] == [hf_greedy(hf, p, NEW) for p in ps]
    al = llm.engine.cache.allocator
    assert llm.engine.scheduler.num_preemptions == 0 and al.stats.device_hit_tokens > 0
    assert al.num_used == 0 and al.promised == 0


def test_pipeline_stages_skip_the_cached_prefix():
    """pp=2 over real worker processes: the controller looks blocks up once, each stage computes
    only the uncached tokens of its own layers; tokens equal a single process without caching."""
    model = "random:llama-tiny"
    r = random.Random(5)
    system = [r.randrange(3, 500) for _ in range(13)]
    ps = [system + [r.randrange(3, 500) for _ in range(k)] for k in (0, 2, 6)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = [o.token_ids for o in LLM(model=model, device="cpu", block_size=BS).generate(ps, sp)]
    with LLM(model=model, device="cpu", pp=2, block_size=BS, kv_cache_blocks=64, microbatch_size=2,
             enable_prefix_caching=True) as llm:
        assert [o.token_ids for o in llm.generate(ps, sp)] == ref
        got = [llm.generate([p], sp)[0].token_ids for p in ps]
        stats = llm.engine.allocator.stats
        assert got == ref and stats.device_hit_tokens >= 3 * 3 * BS
        assert llm.engine.allocator.num_used == 0


def test_cli_flags_in_vllm_spelling():
    from dejavu.cli import build_parser
    from dejavu.cli.prefix_cache import prefix_cache_kwargs

    p = build_parser()
    on = p.parse_args(["generate", "--prompt", "x", "--enable-prefix-caching"])
    off = p.parse_args(["generate", "--prompt", "x", "--no-enable-prefix-caching"])
    assert prefix_cache_kwargs(on)["enable_prefix_caching"] is True
    assert prefix_cache_kwargs(off)["enable_prefix_caching"] is False
    assert prefix_cache_kwargs(p.parse_args(["serve"]))["enable_prefix_caching"] is True  # on by default, as in vLLM
    tiers = p.parse_args(["serve", "--enable-prefix-caching", "--kv-offload-gib", "0.5", "--kv-offload-dir", "/d"])
    assert prefix_cache_kwargs(tiers) == {"enable_prefix_caching": True, "kv_offload_gib": 0.5,
                                          "kv_offload_dir": "/d", "kv_offload_dir_gib": 8.0}
