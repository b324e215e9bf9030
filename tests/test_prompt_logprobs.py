"""Prompt logprobs (echo + logprobs, as lm-eval-harness's loglikelihood tasks ask for them), max_tokens 0,
and lists of prompts in one completions request: checked against HF transformers' log_softmax of
the prompt's logits, in the engine and through the HTTP server."""
import json

import pytest
import torch

from dejavu import LLM, SamplingParams
from dejavu.engine import prompt_logprobs as plp
from hf_models import random_prompts, save_hf_model
from test_server import http

PROMPTS = random_prompts(512, [9, 14, 5], seed=8)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return save_hf_model("llama", path), str(path)


@torch.no_grad()
def _hf_logprobs(model, prompt):
    """log_softmax (fp32) of HF's logits at every prompt position: row j predicts prompt[j + 1]."""
    return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)


@pytest.fixture(scope="module")
def llm(hf):
    # Prefix caching on: a request for prompt logprobs must still compute every prompt position.
    with LLM(device="cpu", model=hf[1], block_size=4, kv_cache_blocks=128, dtype="float32",
             enable_prefix_caching=True) as llm:
        yield llm


def test_prompt_logprobs_are_hfs_log_softmax(hf, llm, monkeypatch):
    model, _ = hf
    monkeypatch.setattr(plp, "CHUNK", 4)  # several LM-head chunks per prompt
    llm.generate(PROMPTS, SamplingParams(max_tokens=2))  # fills the prefix cache with these prompts
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=2, prompt_logprobs=3))
    for prompt, out in zip(PROMPTS, outs):
        want = _hf_logprobs(model, prompt)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for j in range(1, len(prompt)):
            assert got[j][prompt[j]] == pytest.approx(float(want[j - 1, prompt[j]]), abs=1e-4)
            top = want[j - 1].topk(3)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert got[j][t] == pytest.approx(v, abs=1e-4)
            assert len(got[j]) in (3, 4)  # the top 3 and the prompt token itself
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2))[0].prompt_logprobs is None


@pytest.fixture(scope="module")
def server(llm):
    from dejavu.serving.api import ApiServer

    srv = ApiServer(llm, "m")
    port = srv.start_background()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


def _post(base, body):
    code, text = http(base + "/v1/completions", body)
    return code, json.loads(text)


def test_echo_logprobs_max_tokens_0_over_a_batch_like_lm_eval(hf, server):
    model, _ = hf
    # lm-eval local-completions, loglikelihood: token-id prompts in a list, echo, logprobs 1, max_tokens 0.
    code, out = _post(server, {"model": "m", "prompt": PROMPTS, "echo": True, "logprobs": 1, "max_tokens": 0,
                               "temperature": 0})
    assert code == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"] == {"prompt_tokens": sum(map(len, PROMPTS)), "completion_tokens": 0,
                            "total_tokens": sum(map(len, PROMPTS))}
    for prompt, c in zip(PROMPTS, out["choices"]):
        lp, want = c["logprobs"], _hf_logprobs(model, prompt)
        assert c["token_ids"] == [] and c["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx([float(want[j - 1, t]) for j, t in enumerate(prompt)
                                                          if j], abs=1e-4)
        assert [max(d.values()) for d in lp["top_logprobs"][1:]] == pytest.approx(
            want[:len(prompt) - 1].max(-1).values.tolist(), abs=1e-4)
    # max_tokens 1 (lm-eval's older payload): the prompt's entries, then the sampled token's.
    code, one = _post(server, {"prompt": [PROMPTS[0]], "echo": True, "logprobs": 0, "max_tokens": 1,
                               "temperature": 0})
    lp = one["choices"][0]["logprobs"]
    assert code == 200 and len(lp["token_logprobs"]) == len(PROMPTS[0]) + 1
    assert lp["token_logprobs"][:-1] == pytest.approx(out["choices"][0]["logprobs"]["token_logprobs"])
    assert one["choices"][0]["token_ids"] == [int(_hf_logprobs(model, PROMPTS[0])[-1].argmax())]
    # Streamed: the echo chunk carries the prompt's logprobs; no sampled token follows.
    chunks = _stream(server, {"prompt": PROMPTS[1], "echo": True, "logprobs": 1, "max_tokens": 0, "stream": True})
    assert chunks[0]["logprobs"]["token_logprobs"] == out["choices"][1]["logprobs"]["token_logprobs"]
    assert chunks[-1]["finish_reason"] == "length" and all(c["token_ids"] == [] for c in chunks)


def _stream(base, body):
    code, text = http(base + "/v1/completions", body)
    assert code == 200
    return [json.loads(line[6:])["choices"][0] for line in text.splitlines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]]


def test_a_list_of_prompts_with_n_orders_choices_as_openai(server):
    # generate_until with --batch_size: several prompts, each with n choices, index = prompt * n + choice.
    body = {"prompt": PROMPTS, "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 4, "ignore_eos": True}
    code, out = _post(server, body)
    assert code == 200 and [c["index"] for c in out["choices"]] == list(range(6))
    for i, prompt in enumerate(PROMPTS):
        code, alone = _post(server, {**body, "prompt": prompt})
        assert [c["token_ids"] for c in alone["choices"]] == [c["token_ids"] for c in out["choices"][2 * i:2 * i + 2]]
    assert out["usage"]["prompt_tokens"] == sum(map(len, PROMPTS)) and out["usage"]["completion_tokens"] == 18


@pytest.mark.parametrize("body,field", [
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [[1, 2], "x", 3]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[5]] * 257}, "prompt"),
    ({"prompt": [[1, 2], [10**6]]}, "prompt"),
])
def test_bad_prompt_lists_and_max_tokens_are_400s(server, body, field):
    code, out = _post(server, body)
    assert code == 400 and out["error"]["param"] == field, out
