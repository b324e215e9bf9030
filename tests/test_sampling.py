"""Seeded sampling: reproducible, independent of batch composition; stop conditions."""
import pytest

from dejavu import LLM, SamplingParams
import torch

from dejavu.engine.sampler import position_seed, sample, uniforms


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", model="random:llama-tiny", block_size=4, seed=7)


def test_draws_depend_only_on_seed_position_and_token():
    keys = torch.tensor([position_seed(5, 10), position_seed(5, 11), position_seed(6, 10)])
    u = uniforms(keys, 1000)
    assert torch.equal(u[0], uniforms(keys[:1], 1000)[0])  # a row's draws do not depend on the others
    assert torch.equal(u[0, :10], uniforms(keys[:1], 10)[0])  # nor on the vocabulary's size
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert len(set(u[0].tolist())) == 1000  # one key: a permutation of distinct draws
    assert abs(float(u.mean()) - 0.5) < 0.02


def test_sampled_row_is_the_same_alone_or_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=1) for t, k, p in
              [(0.7, 0, 1.0), (1.0, 40, 1.0), (0, 0, 1.0), (1.3, 0, 0.9), (0.9, 20, 0.8), (1.0, 0, 1.0)]]
    seeds, positions = [3, 4, 5, 6, 7, 8], [10, 3, 99, 12, 7, 40]
    batch = sample(logits.clone(), params, seeds, positions, [[]] * 6)
    for i in range(6):
        assert sample(logits[i:i + 1].clone(), [params[i]], [seeds[i]], [positions[i]], [[]]) == [batch[i]]
    assert batch[2] == int(torch.argmax(logits[2]))


def test_keyed_race_samples_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    sp = SamplingParams(temperature=0.8, top_k=4, seed=0)
    n = 4000
    counts = torch.zeros(6)
    for pos in range(n):
        counts[sample(logits.clone(), [sp], [17], [pos], [[]])[0]] += 1
    want = torch.softmax(logits[0, :4] / 0.8, -1)
    assert counts[4:].sum() == 0  # outside the top 4
    assert torch.allclose(counts[:4] / n, want.float(), atol=0.03), (counts / n, want)
    top_p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)  # p(token 0) = 0.6 >= 0.5: only it
    assert {sample(logits.clone(), [top_p], [1], [pos], [[]])[0] for pos in range(50)} == {0}


def test_same_seed_same_tokens_whatever_the_batch(llm):
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=7, temperature=0.8, seed=99, ignore_eos=True)
    target = [5, 17, 300, 41, 9, 1000]
    alone = llm.generate([target], sp)[0].token_ids
    crowded = llm.generate([[7] * 9, target, [123, 456], [1] * 30], [other, sp, other, SamplingParams(max_tokens=3)])
    assert crowded[1].token_ids == alone
    # The same seed drawn twice is the same; a different seed differs (20 tokens, vocab 49k).
    assert llm.generate([target], sp)[0].token_ids == alone
    sp2 = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=4321, ignore_eos=True)
    assert llm.generate([target], sp2)[0].token_ids != alone


def test_top_k_one_is_greedy(llm):
    p = [3, 14, 15, 92, 65]
    greedy = llm.generate([p], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    k1 = llm.generate([p], SamplingParams(max_tokens=10, temperature=1.3, top_k=1, seed=3, ignore_eos=True))[0]
    assert k1.token_ids == greedy


def test_stop_token_ids_and_max_tokens(llm):
    p = [3, 14, 15, 92, 65]
    full = llm.generate([p], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(full.token_ids) == 10 and full.finish_reason == "length"
    stop_at = full.token_ids[4]
    first = full.token_ids.index(stop_at)
    cut = llm.generate([p], SamplingParams(max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert cut.token_ids == full.token_ids[:first + 1] and cut.finish_reason == "stop"
    # min_tokens bans the stop token until reached.
    late = llm.generate([p], SamplingParams(max_tokens=10, stop_token_ids=[stop_at], min_tokens=first + 2,
                                            ignore_eos=True))[0]
    assert stop_at not in late.token_ids[:first + 2]


def test_stop_string_truncates_text(llm):
    p = [3, 14, 15, 92, 65]
    full = llm.generate([p], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(full.text) > 4
    marker = full.text[2:4]
    out = llm.generate([p], SamplingParams(max_tokens=12, stop=[marker], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert marker not in out.text and full.text.startswith(out.text)


def test_invalid_sampling_params():
    for kw, word in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
                     ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                     ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"), ({"min_tokens": 99}, "min_tokens")]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kw)


def test_seeded_request_is_the_same_in_a_pipeline_and_across_a_recovery(llm):
    """Alone in one process == in a mixed batch on a pp=2 pipeline == the same with its last stage
    (the sampling one) killed mid-generation and recovered from replicas."""
    import os
    import signal

    sp = SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=2024, ignore_eos=True)
    target = [11, 22, 33, 44]
    alone = llm.generate([target], sp)[0].token_ids
    others = [([7] * 13, SamplingParams(max_tokens=30, temperature=1.1, seed=5, ignore_eos=True)),
              ([1, 2], SamplingParams(max_tokens=9, temperature=0.7, ignore_eos=True)),  # unseeded
              (list(range(40, 60)), SamplingParams(max_tokens=20, ignore_eos=True))]     # greedy
    pipe = LLM(model="random:llama-tiny", block_size=4, seed=7, pp=2, kv_cache_blocks=256, worker_timeout=60,
               replicate=True)
    try:
        outs = pipe.generate([p for p, _ in others[:2]] + [target] + [others[2][0]],
                             [s for _, s in others[:2]] + [sp] + [others[2][1]])
        assert outs[2].token_ids == alone
        eng = pipe.engine
        seqs = [eng.add_request(p, s) for p, s in others] + [eng.add_request(target, sp)]
        for _ in range(10):
            eng.step()
        assert 0 < seqs[-1].num_output_tokens < sp.max_tokens  # killed mid-generation
        os.kill(eng.worker_info[1]["pid"], signal.SIGKILL)
        while eng.has_unfinished():
            eng.step()
        assert eng.fault_tolerance()["failures"] == 1
        assert seqs[-1].output_ids == alone
    finally:
        pipe.shutdown()
