"""vLLM users' sampling fields and the OpenAI response surface: penalties, min_p, logit_bias, n,
logprobs and echo, checked against HF transformers' own logits and processors, in every mode
(single process, a pp=2 pipeline, prompt-token disaggregation) and through the HTTP server."""
import json

import pytest
import torch
import transformers as T

from dejavu import LLM, RequestError, SamplingParams
from dejavu.engine.sampler import pick
from dejavu.models.loader import load_tokenizer, resolve
from dejavu.sampling_params import choice_seed
from dejavu.engine.detok import IncrementalDecoder
from dejavu.serving.detok import TextStream
from hf_models import random_prompts, save_hf_model

openai = pytest.importorskip("openai")


# ---------------------------------------------------------------------- the sampler against HF's processors
def _processed(logits, sp, seen=None, banned=None):
    """The logits `pick` ended with (it processes them in place) and its token."""
    out = logits.clone()
    tok, _ = pick(out, [sp], [1], [len(seen[0]) if seen else 0], [banned or []], [seen] if seen else None)
    return out, tok[0]


def test_repetition_penalty_is_hfs_processor():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 3
    seen = [3, 7, 7, 9, 40, 11, 11]
    for rp in (1.3, 0.7):
        got, tok = _processed(logits, SamplingParams(repetition_penalty=rp), (seen, 4))
        want = T.RepetitionPenaltyLogitsProcessor(rp)(torch.tensor([seen]), logits.clone())
        assert torch.allclose(got, want) and tok == int(want.argmax())


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    seen, n_prompt = [5, 5, 5, 8, 9, 9, 9, 12], 3  # prompt 5 5 5; output 8 9 9 9 12
    got, _ = _processed(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=1.5), (seen, n_prompt))
    want = logits.clone()
    for t, c in ((8, 1), (9, 3), (12, 1)):  # OpenAI's formula: c * frequency + (c > 0) * presence
        want[0, t] -= c * 0.5 + 1.5
    assert torch.allclose(got, want)  # token 5 (prompt only) untouched


def test_logit_bias_forces_a_token_and_min_p_keeps_hfs_set():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    weakest = int(logits.argmin())
    _, tok = _processed(logits, SamplingParams(logit_bias={weakest: 100}))
    assert tok == weakest
    _, tok = _processed(logits, SamplingParams(logit_bias={int(logits.argmax()): -100}))
    assert tok == int(logits[0].topk(2).indices[1])
    sharp = torch.tensor([[3.0, 2.6, 2.0, 0.5, 0.0, -1.0]])
    kept = T.MinPLogitsWarper(0.3)(None, sharp.clone()) > float("-inf")
    sp = SamplingParams(temperature=1.0, min_p=0.3, seed=3)
    drawn = {pick(sharp.clone(), [sp], [9], [pos], [[]])[0][0] for pos in range(400)}
    assert drawn == set(kept[0].nonzero().flatten().tolist())


def test_n_choices_have_distinct_reproducible_seeds():
    cs = SamplingParams(n=4, seed=11, temperature=1.0).choices()
    assert [c.n for c in cs] == [1] * 4 and cs[0].seed == 11
    assert [c.seed for c in cs[1:]] == [choice_seed(11, i) for i in (1, 2, 3)]
    assert len({c.seed for c in cs}) == 4 and choice_seed(11, 1) != choice_seed(12, 0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=2)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: float("nan")})


# ---------------------------------------------------------------------- every engine mode against HF
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return save_hf_model("llama", path), str(path)


PROMPTS = random_prompts(512, [7, 12, 5], seed=3)
N = 10


@torch.no_grad()
def _hf_reference(model, prompt, **kw):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                         do_sample=False, **kw)[0]
    logp = torch.log_softmax(model(out[None]).logits[0].float(), -1)
    gen = out[len(prompt):].tolist()
    return gen, [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(gen)]


MODES = {"single": {}, "pp2": dict(pp=2, microbatch_size=2),
         "disagg": dict(prompt_stages=1, token_stages=1, kv_transport="tcp")}


@pytest.mark.parametrize("mode", list(MODES))
def test_new_fields_in_every_mode(hf, mode):
    model, path = hf
    rep = SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=1.4, logprobs=3)
    freq = SamplingParams(max_tokens=N, ignore_eos=True, frequency_penalty=1.0, presence_penalty=0.5)
    bias = SamplingParams(max_tokens=N, ignore_eos=True, logit_bias={77: 100.0})
    sampled = SamplingParams(max_tokens=N, ignore_eos=True, temperature=0.9, min_p=0.05, seed=5, n=2,
                             frequency_penalty=0.3)
    with LLM(device="cpu", model=path, block_size=4, kv_cache_blocks=128, dtype="float32", worker_timeout=60,
             **MODES[mode]) as llm:
        outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]], [rep, freq, bias, sampled])
        if mode != "single":  # prompt logprobs need every prompt row's logits: a clear refusal in a pipeline
            with pytest.raises(RequestError, match="prompt logprobs"):
                llm.generate([PROMPTS[0]], SamplingParams(prompt_logprobs=1))
    want, want_lp = _hf_reference(model, PROMPTS[0], repetition_penalty=1.4)
    assert outs[0].token_ids == want
    got_lp = [d[t] for d, t in zip(outs[0].outputs[0].logprobs, want)]  # raw model logprobs, not penalized
    assert torch.allclose(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4)
    assert all(len(d) in (3, 4) for d in outs[0].outputs[0].logprobs)
    # Frequency/presence: OpenAI's formula applied to HF's logits, step by step.
    ids = list(PROMPTS[1])
    with torch.no_grad():
        for _ in range(N):
            lg = model(torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ids[len(PROMPTS[1]):] or [0]), minlength=512)[:512].float()
            if len(ids) == len(PROMPTS[1]):
                counts.zero_()
            ids.append(int((lg - counts * 1.0 - (counts > 0).float() * 0.5).argmax()))
    assert outs[1].token_ids == ids[len(PROMPTS[1]):]
    assert outs[2].token_ids == [77] * N
    two = outs[3].outputs
    assert len(two) == 2 and two[0].token_ids != two[1].token_ids and outs[3].outputs[0].index == 0
    assert outs[0].outputs[0].logprobs is not None and outs[1].outputs[0].logprobs is None
    if mode == "single":
        test_new_fields_in_every_mode.single = [o.token_ids for o in two]
    elif hasattr(test_new_fields_in_every_mode, "single"):  # the same (seed, position) draws in any mode
        assert [o.token_ids for o in two] == test_new_fields_in_every_mode.single


# ---------------------------------------------------------------------- incremental detokenization
def test_incremental_decoder_never_splits_a_character():
    tok = load_tokenizer(resolve("random:llama-tiny"))  # SmolLM2's byte-level BPE
    text = "héllo 🎉🎉 wörld 日本語 🤖!"
    ids = tok.encode(text)
    assert any(tok.decode([t]) == "\ufffd" for t in ids)  # some tokens are parts of a character
    dec = IncrementalDecoder(tok)
    deltas = [dec.push([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == tok.decode(ids) == text
    ts = TextStream(tok, ["wör"])  # holds back what may begin a stop string
    sent = "".join(ts.delta([t]) for t in ids[:11])  # "héllo 🎉🎉 wör" decoded
    assert sent == "héllo 🎉🎉 w"  # its last len("wör") - 1 characters wait


# ---------------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def server():
    from dejavu.serving.api import ApiServer

    llm = LLM(device="cpu", model="random:llama-tiny", block_size=4, kv_cache_blocks=512, max_model_len=512)
    srv = ApiServer(llm, "m", max_queue=64)
    port = srv.start_background()
    yield srv, f"http://127.0.0.1:{port}", openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                                        max_retries=0, timeout=60)
    srv.stop()


def _post(base, path, body):
    from test_server import http
    code, text = http(base + path, body)
    return code, json.loads(text)


def test_logit_bias_penalties_and_n_streaming(server):
    _, base, client = server
    tok = server[0].llm.tokenizer
    forced = tok.encode("🎉")[0]  # a token that is only part of a character
    r = client.completions.create(model="m", prompt="Hi", max_tokens=6, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == [forced] * 6
    kw = dict(model="m", prompt="Once upon", max_tokens=8, temperature=1.0, seed=7, n=3, presence_penalty=0.5,
              frequency_penalty=0.4, extra_body={"ignore_eos": True, "repetition_penalty": 1.2, "min_p": 0.01})
    whole = client.completions.create(**kw)
    texts = ["", "", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices] and len(set(texts)) == 3
    # A stream of partial-character tokens: the deltas still add up to the final text.
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="Hi", max_tokens=5, temperature=0, stream=True,
        logit_bias={str(forced): 100, str(tok.encode("🎉")[1]): 99.99}, extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == client.completions.create(model="m", prompt="Hi", max_tokens=5, temperature=0,
                                                 logit_bias={str(forced): 100, str(tok.encode("🎉")[1]): 99.99},
                                                 extra_body={"ignore_eos": True}).choices[0].text


def test_completion_and_chat_logprobs_streamed_or_not(server):
    _, base, client = server
    kw = dict(model="m", prompt="The sky", max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(v) and top.get(t, v) == pytest.approx(v)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
    assert sum((s.token_logprobs for s in streamed if s), []) == pytest.approx(lp.token_logprobs)
    zero = client.completions.create(**{**kw, "logprobs": 0}).choices[0].logprobs
    assert zero.token_logprobs == pytest.approx(lp.token_logprobs) and zero.top_logprobs == [{}] * 6
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="m", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    content = chat.logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == chat.message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    echo = client.completions.create(model="m", prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model="m", prompt="Echo me", max_tokens=3, temperature=0)
    assert echo.choices[0].text == "Echo me" + plain.choices[0].text


@pytest.mark.parametrize("body,field", [
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"n": 17}, "n"), ({"logprobs": 6}, "logprobs"),
    ({"best_of": 3}, "best_of"),
])
def test_bad_fields_are_400s_naming_the_field(server, body, field):
    code, out = _post(server[1], "/v1/completions", {"prompt": "x", **body})
    assert code == 400 and out["error"]["param"] == field and field in out["error"]["message"]
    code, out = _post(server[1], "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": 2})
    assert code == 400 and out["error"]["param"] == "top_logprobs"


def test_tokenize_detokenize_version_and_models(server):
    srv, base, client = server
    from test_server import http
    tok = srv.llm.tokenizer
    code, out = _post(base, "/tokenize", {"prompt": "héllo 🎉", "return_token_strs": True})
    assert code == 200 and out["tokens"] == tok.encode("héllo 🎉") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512 and len(out["token_strs"]) == out["count"]
    code, chat = _post(base, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert code == 200 and chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert _post(base, "/detokenize", {"tokens": out["tokens"]}) == (200, {"prompt": "héllo 🎉"})
    for bad, field in (({"tokens": [10**9]}, "tokens"), ({"tokens": "abc"}, "tokens")):
        code, err = _post(base, "/detokenize", bad)
        assert code == 400 and err["error"]["param"] == field
    code, err = _post(base, "/tokenize", {"prompt": 5})
    assert code == 400 and err["error"]["param"] == "prompt"
    code, text = http(base + "/tokenizer_info")  # lm-eval's remote tokenizer backend starts here
    info = json.loads(text)
    assert code == 200 and info["eos_token"] == tok.tok.eos_token and info["model_max_length"] == 512
    code, plain = _post(base, "/tokenize", {"prompt": info["eos_token"] + "hi", "add_special_tokens": False})
    assert code == 200 and plain["tokens"][0] == tok.eos_token_id
    code, err = _post(base, "/tokenize", {"prompt": "hi", "add_special_tokens": "no"})
    assert code == 400 and err["error"]["param"] == "add_special_tokens"
    code, text = http(base + "/version")
    import dejavu
    assert code == 200 and json.loads(text)["version"] == dejavu.__version__
    card = client.models.retrieve("m")
    assert card.id == "m" and card.model_extra["max_model_len"] == 512
    assert client.models.list().data[0].model_extra["root"] == "m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)


def test_vllm_named_metrics(server):
    srv, base, client = server
    from test_server import http
    _, before = http(base + "/metrics")

    def value(text, name):
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)
    key = 'dejavu:generation_tokens_total{model_name="m"}'
    client.completions.create(model="m", prompt="count me", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    _, after = http(base + "/metrics")
    assert value(after, key) - value(before, key) == 4
    assert value(after, 'dejavu:request_success_total{model_name="m",finished_reason="length"}') >= 1
    assert "# TYPE dejavu:time_to_first_token_seconds histogram" in after
    assert value(after, 'dejavu:time_to_first_token_seconds_bucket{model_name="m",le="+Inf"}') == \
        value(after, 'dejavu:time_to_first_token_seconds_count{model_name="m"}') > 0
    assert 'dejavu:time_to_first_token_seconds_bucket{model_name="m",le="0.001"}' in after
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total"):
        assert 0 <= value(after, f'dejavu:{gauge}{{model_name="m"}}') <= 1e9


def test_developer_role_tools_unknown_fields_and_fingerprint(server, caplog):
    srv, base, client = server
    as_system = _post(base, "/tokenize", {"messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hi"}]})
    as_developer = _post(base, "/tokenize", {"messages": [{"role": "developer", "content": "be brief"},
                                                           {"role": "user", "content": "hi"}]})
    assert as_system[0] == 200 and as_developer == as_system  # OpenAI's developer role is the system prompt
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=0)
    assert chat.system_fingerprint == srv.fingerprint and chat.system_fingerprint.startswith("fp_")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported") as e:
        client.chat.completions.create(model="m", messages=msgs, max_tokens=3, tools=[tool])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=msgs, max_tokens=3, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"
    ok = client.chat.completions.create(model="m", messages=msgs, max_tokens=3, temperature=0, tools=[tool],
                                        tool_choice="none")
    assert ok.choices[0].message.content == chat.choices[0].message.content
    with caplog.at_level("WARNING", logger="dejavu.server"):
        for _ in range(2):  # ignored as vLLM does, and logged once
            r = client.completions.create(model="m", prompt="x", max_tokens=2, temperature=0,
                                          extra_body={"frobnicate": 1, "guided_json": {}})
            assert r.system_fingerprint == srv.fingerprint
    said = [rec.getMessage() for rec in caplog.records if "frobnicate" in rec.getMessage()]
    assert len(said) == 1 and "'guided_json'" in said[0]
    chunks = list(client.completions.create(model="m", prompt="x", max_tokens=2, stream=True))
    assert chunks and all(c.system_fingerprint == srv.fingerprint for c in chunks)


def test_chat_over_a_list_of_conversations_with_a_progress_bar(capfd):
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(device="cpu", model="random:llama-tiny", block_size=4, kv_cache_blocks=128) as llm:
        capfd.readouterr()
        both = llm.chat(convs, sp, use_tqdm=True)
        assert "Processed prompts" in capfd.readouterr().err.replace("\r", "\n").splitlines()[-1]
        one = llm.chat(convs[1], sp)  # one conversation: a list of one output, as vLLM returns
        assert capfd.readouterr().err == ""  # no bar unless asked
        assert len(both) == 2 and len(one) == 1 and one[0].outputs[0].token_ids == both[1].token_ids
        assert both[0].prompt_token_ids == llm.tokenizer.apply_chat_template(convs[0])
        assert llm.generate(["a", "b"], sp, use_tqdm=True)[1].token_ids == llm.generate(["b"], sp)[0].token_ids
        assert "2/2" in capfd.readouterr().err
        with pytest.raises(ValueError, match="messages must be"):
            llm.chat([])
