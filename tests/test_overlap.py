"""Overlapped decode steps (engine/llm_engine.py): a greedy step queued before the host reads the
tokens of the step before, its input ids taken from the device. Every case runs the same requests
with overlap on and off and wants the same tokens and finish reasons; on a CPU the steps run eagerly
(test_kernels_cuda.py repeats it through CUDA graphs)."""
from __future__ import annotations

import torch

from dejavu import LLM, SamplingParams
from hf_models import hf_greedy, save_hf_model

PROMPT_LENS = [1, 4, 5, 11, 23]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _pair(path, **kw) -> tuple[LLM, LLM]:
    kw.setdefault("device", "cpu")
    on = LLM(model=str(path), block_size=4, dtype="float32", **kw)
    off = LLM(model=str(path), block_size=4, dtype="float32", overlap_steps=False, **kw)
    assert on.engine.overlap and not off.engine.overlap
    return on, off


def _outs(llm: LLM, prompts, params) -> list[tuple[list[int], str]]:
    return [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]


def test_overlapped_steps_match_hf_and_chain(tmp_path):
    hf = save_hf_model("llama", tmp_path)
    on, off = _pair(tmp_path)
    ps = _prompts(hf.config.vocab_size)
    # different lengths: sequences leave the batch at different steps
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (12, 3, 1, 7, 12)]
    got = _outs(on, ps, params)
    assert got == _outs(off, ps, params)
    for p, sp, (toks, reason) in zip(ps, params, got):
        assert toks == hf_greedy(hf, p, sp.max_tokens) and reason == "length"
    assert on.engine.num_chained > 0 and off.engine.num_chained == 0
    assert all(not s.inflight for s in on.engine.scheduler.running)
    assert on.engine.cache.allocator.num_used == 0  # every block came back


def test_a_stop_token_drops_the_queued_step(tmp_path):
    """A sequence that stops on a token while the next step is queued for it: that step's token is
    dropped and the others go on."""
    hf = save_hf_model("llama", tmp_path)
    on, off = _pair(tmp_path)
    ps = _prompts(hf.config.vocab_size, seed=1)
    free = off.generate(ps, SamplingParams(max_tokens=12, ignore_eos=True))
    # each sequence stops at the first token from its 3rd, 4th, ... on that it had not produced before
    params = []
    for i, o in enumerate(free):
        t = o.token_ids
        new = [x for j, x in enumerate(t) if j >= 2 + i % 3 and x not in t[:j]]
        params.append(SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=new[:1]))
    got = _outs(on, ps, params)
    assert got == _outs(off, ps, params)
    assert any(reason == "stop" and len(t) < 12 for t, reason in got)
    assert on.engine.num_chained > 0
    assert on.engine.cache.allocator.num_used == 0


def test_min_tokens_sampling_and_preemption_fall_back_exactly(tmp_path):
    """Steps that cannot be queued unread (a banned EOS before min_tokens, a sampled request, a cache
    that forces preemption) run as before, and the tokens do not change."""
    hf = save_hf_model("gpt2", tmp_path)
    ps = _prompts(hf.config.vocab_size, seed=2)
    on, off = _pair(tmp_path, kv_cache_blocks=14)
    params = [SamplingParams(max_tokens=10, min_tokens=4), SamplingParams(max_tokens=10, temperature=0.8, seed=5),
              SamplingParams(max_tokens=10, ignore_eos=True), SamplingParams(max_tokens=10, min_tokens=10),
              SamplingParams(max_tokens=10, ignore_eos=True)]
    assert _outs(on, ps, params) == _outs(off, ps, params)
    assert on.engine.scheduler.num_preemptions > 0
    # all greedy, min_tokens met partway: steps are queued once nothing can be banned
    greedy = [SamplingParams(max_tokens=10, min_tokens=3)] * len(ps)
    before = on.engine.num_chained
    assert _outs(on, ps, greedy) == _outs(off, ps, greedy)
    assert on.engine.num_chained > before


def test_requests_arriving_and_aborted_mid_decode(tmp_path):
    hf = save_hf_model("bloom", tmp_path)
    ps = _prompts(hf.config.vocab_size, seed=3)
    results = []
    for llm in _pair(tmp_path):
        eng = llm.engine
        params = SamplingParams(max_tokens=9, ignore_eos=True)
        first = [eng.add_request(p, params) for p in ps[:3]]
        steps = 0
        late = None
        while eng.has_unfinished() or late is None:
            eng.step()
            steps += 1
            if steps == 4:
                late = eng.add_request(ps[3], params)  # joins while a step may be queued
                eng.abort(first[1])
        eng.step()  # lands a step still queued for sequences that finished
        results.append([(s.output_ids, s.finish_reason) for s in first + [late]])
        assert not any(s.inflight for s in first + [late])
        assert eng.cache.allocator.num_used == 0
    # (tokens land a call later with overlap, so the abort cuts the second one at another length)
    keep = [0, 2, 3]
    assert [results[0][i] for i in keep] == [results[1][i] for i in keep]
    assert results[0][3][0] == hf_greedy(hf, ps[3], 9)
    for r in results:
        ids, reason = r[1]
        assert reason == "abort" and ids == hf_greedy(hf, ps[1], 9)[:len(ids)]


def test_decode_steps_hand_their_slots_to_on_step_as_they_are_queued(tmp_path):
    """ModelRunner.set_kv_tap(tap, on_step), as replication uses it: every decode step passes the
    slots it writes to on_step when it is queued, overlapped steps included, each position once;
    the tokens do not change, and a tap without on_step is refused."""
    import pytest

    hf = save_hf_model("llama", tmp_path)
    on, off = _pair(tmp_path)
    seen = []
    on.engine.runner.set_kv_tap(None, lambda written: seen.append([(list(t), a, b) for t, a, b in written]))
    ps = _prompts(hf.config.vocab_size, seed=2)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert _outs(on, ps, params) == _outs(off, ps, params)
    assert on.engine.num_chained > 0
    # per sequence (its first block): the positions written, one per decode step
    by_seq = {}
    for written in seen:
        for table, a, b in written:
            assert b == a + 1
            by_seq.setdefault(table[0], []).append(a)
    # the first token comes from the prefill; decode steps 1-5 write positions n .. n + 4
    assert sorted(sorted(p) for p in by_seq.values()) == sorted(list(range(n, n + 5)) for n in PROMPT_LENS)
    on.engine.runner.set_kv_tap(None)
    with pytest.raises(ValueError, match="needs on_step"):
        on.engine.runner.set_kv_tap(object())
