"""Loading is exact or refuses: every family variant gives HF's greedy tokens in one process and in
a pipeline, and a checkpoint tensor or config field we cannot honour is refused by name."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_cuda
from dejavu import LLM, SamplingParams
from dejavu.models.config import ModelError
from dejavu.models.loader import resolve
from hf_models import VARIANTS, assert_prefill_logits_close, hf_greedy, random_prompts, save_hf_model

PROMPT_LENS = [1, 5, 11, 23]  # with 12 new tokens, past the 8-key windows of the windowed variants
NEW_TOKENS = 12


def prompts(vocab, seed=0):
    return random_prompts(vocab, PROMPT_LENS, seed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_hf(variant, tmp_path):
    hf = save_hf_model(variant, tmp_path)
    ps = prompts(hf.config.vocab_size)
    ref = [hf_greedy(hf, p, NEW_TOKENS) for p in ps]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    llm = LLM(model=str(tmp_path), block_size=4, dtype="float32", device="cpu")
    assert [o.token_ids for o in llm.generate(ps, params)] == ref, f"{variant}: one process diverged from HF"
    with LLM(model=str(tmp_path), pp=2, block_size=4, dtype="float32", device="cpu", kv_cache_blocks=96) as pipe:
        assert [o.token_ids for o in pipe.generate(ps, params)] == ref, f"{variant}: pp=2 diverged from HF"
    # Logits too: a setting that moves them without changing these few tokens cannot hide.
    assert_prefill_logits_close(llm, hf, ps)


def _edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def test_qwen2_without_attention_bias_field_keeps_its_biases(tmp_path):
    """Qwen2 configs carry no attention_bias key, yet their q/k/v have biases: they must be used."""
    hf = save_hf_model("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "attention_bias" not in cfg
    assert resolve(str(tmp_path)).config.qkv_bias and not resolve(str(tmp_path)).config.o_bias
    assert torch.count_nonzero(hf.model.layers[0].self_attn.q_proj.bias) > 0


def test_unused_checkpoint_tensor_is_refused_by_name(tmp_path):
    save_hf_model("llama", tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(f)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # a QK norm our Llama has no place for
    save_file(state, f)
    with pytest.raises(ModelError, match=r"q_norm\.weight"):
        LLM(model=str(tmp_path), device="cpu")


def test_rotary_buffer_is_a_known_non_weight(tmp_path):
    hf = save_hf_model("llama", tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(f)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, f)
    p = prompts(512)[2]
    out = LLM(model=str(tmp_path), block_size=4, device="cpu").generate([p], SamplingParams(max_tokens=6,
                                                                                            ignore_eos=True))
    assert out[0].token_ids == hf_greedy(hf, p, 6)


@pytest.mark.parametrize("family,fields,named", [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"some_new_switch": True}, "some_new_switch"),
    ("llama", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ("llama", {"hidden_act": "relu2"}, "hidden_act"),
    ("qwen2", {"use_mrope": True}, "use_mrope"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("opt", {"model_type": "falcon"}, "falcon"),
])
def test_config_field_we_cannot_honour_is_refused(tmp_path, family, fields, named):
    save_hf_model(family, tmp_path)
    _edit_config(tmp_path, **fields)
    with pytest.raises(ModelError, match=named):
        resolve(str(tmp_path))


def test_generation_and_training_fields_are_accepted(tmp_path):
    """Fields that never change the forward pass (dropout, init, generation defaults) load."""
    save_hf_model("llama", tmp_path)
    _edit_config(tmp_path, attention_dropout=0.1, initializer_range=0.01, temperature=0.7, max_length=30,
                 architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", pretraining_tp=2)
    src = resolve(str(tmp_path))
    assert src.dtype == "bfloat16" and src.config.hf_model_type == "llama"


def test_directory_without_tokenizer_serves_token_ids_only(tmp_path):
    """Any vocabulary size (here 100, under the byte tokenizer's 258): token ids work, text fails clearly."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), block_size=4, device="cpu")
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, [5, 6, 7], 5) and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer files"):  # a RequestError naming the ModelError
        llm.generate(["hello"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2, stop=["x"]))


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch):
    """org/name is looked up in the HF cache offline; an absent one says how to get it."""
    hub = tmp_path / "hub"
    snap = hub / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (hub / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    hf = save_hf_model("llama", snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    llm = LLM(model="tiny-org/tiny-llama", block_size=4, device="cpu")
    p = prompts(512)[1]
    assert llm.generate([p], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids == hf_greedy(hf, p, 4)
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache.*huggingface-cli download"):
        resolve("tiny-org/absent-model")


def test_dtype_auto_follows_device_and_checkpoint():
    from dejavu.models.loader import parse_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert parse_dtype("auto", cpu, "bfloat16") == torch.float32
    assert parse_dtype("auto", cuda, "bfloat16") == torch.bfloat16
    assert parse_dtype("auto", cuda, "float32") == torch.float16
    assert parse_dtype("auto", cuda, None) == torch.float16


@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_on_cuda_matches_hf(variant, tmp_path):
    """fp32 on the GPU: CUDA graphs and our kernels where the model allows them; windowed models
    and head sizes our decode kernel lacks run without graphs on the torch attention. HF's tokens
    either way."""
    from dejavu import kernels

    hf = save_hf_model(variant, tmp_path)
    ps = prompts(hf.config.vocab_size, seed=2)
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float32", block_size=4, max_num_seqs=8)
    cache = llm.engine.cache
    fast = not llm.config.sliding_window and kernels.usable(cache.tensor, cache.head_dim)
    assert (llm.engine.runner.graphs is not None) == fast
    outs = llm.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, NEW_TOKENS), f"{variant}: prompt of {len(p)} tokens diverged on CUDA"


def _write_gguf(path, hf, extra_tensors=(), extra_fields=()):
    """A GGUF file of HF Llama model `hf` in llama.cpp's layout (q/k rows permuted), fp32, no tokenizer."""
    import numpy as np
    from gguf import GGUFWriter

    c = hf.config
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_uint32("llama.vocab_size", c.vocab_size)
    for key, value in extra_fields:
        w.add_string(key, value)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in hf.state_dict().items():
        a = t.detach().float().numpy()
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            if mod == "self_attn.q_proj":
                a = permute(a, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                a = permute(a, c.num_key_value_heads)
            name = f"blk.{i}.{names[mod]}.{kind}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        w.add_tensor(name, np.ascontiguousarray(a))
    for name, a in extra_tensors:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loads_exactly_and_refuses_what_it_cannot_honour(tmp_path):
    import numpy as np

    hf = save_hf_model("llama", tmp_path / "hf")
    _write_gguf(tmp_path / "m.gguf", hf)
    ps = prompts(hf.config.vocab_size, seed=4)
    llm = LLM(model=str(tmp_path / "m.gguf"), block_size=4, device="cpu")
    outs = llm.generate(ps, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in ps]
    bf16 = LLM(model=str(tmp_path / "m.gguf"), block_size=4, device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    _write_gguf(tmp_path / "qnorm.gguf", hf, extra_tensors=[("blk.0.attn_q_norm.weight", np.ones(16, np.float32))])
    with pytest.raises(ModelError, match="attn_q_norm"):
        LLM(model=str(tmp_path / "qnorm.gguf"), device="cpu")
    _write_gguf(tmp_path / "yarn.gguf", hf, extra_fields=[("llama.rope.scaling.type", "yarn")])
    with pytest.raises(ModelError, match="rope.scaling.type"):
        resolve(str(tmp_path / "yarn.gguf"))
