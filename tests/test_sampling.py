"""Seeded sampling: reproducible, independent of batch composition; stop conditions."""
import pytest

from dejavu import LLM, SamplingParams
from dejavu.engine.sampler import uniform


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", model="random:llama-tiny", block_size=4, seed=7)


def test_uniform_depends_only_on_seed_and_position():
    assert uniform(5, 10) == uniform(5, 10)
    assert uniform(5, 10) != uniform(5, 11)
    assert uniform(5, 10) != uniform(6, 10)
    assert all(0.0 <= uniform(s, p) < 1.0 for s in range(5) for p in range(50))


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
