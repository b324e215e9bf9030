"""The oracle: greedy tokens identical to HF transformers' generate, logits close, every family."""
import pytest
import torch

from dejavu import LLM, SamplingParams
from hf_models import TINY, assert_prefill_logits_close, hf_greedy, random_prompts, save_hf_model

# Lengths chosen to start, end and cross block boundaries (block_size=4 below).
PROMPT_LENS = [1, 4, 5, 11, 23]
NEW_TOKENS = 12


def prompts(vocab, seed=0):
    return random_prompts(vocab, PROMPT_LENS, seed)


@pytest.mark.parametrize("family", list(TINY))
def test_greedy_matches_hf(family, tmp_path):
    hf = save_hf_model(family, tmp_path)
    llm = LLM(device="cpu", model=str(tmp_path), block_size=4, dtype="float32")
    ps = prompts(hf.config.vocab_size)
    ours = llm.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, o in zip(ps, ours):
        assert o.token_ids == hf_greedy(hf, p, NEW_TOKENS), f"{family}: prompt of {len(p)} tokens diverged"
        assert o.finish_reason == "length"


@pytest.mark.parametrize("family", list(TINY))
def test_prefill_logits_close_to_hf(family, tmp_path):
    hf = save_hf_model(family, tmp_path, seed=3)
    llm = LLM(device="cpu", model=str(tmp_path), block_size=4, dtype="float32")
    assert_prefill_logits_close(llm, hf, prompts(hf.config.vocab_size, seed=5))


def test_pytorch_bin_checkpoint(tmp_path):
    hf = save_hf_model("opt", tmp_path, safe=False)
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    llm = LLM(device="cpu", model=str(tmp_path), block_size=4)
    p = prompts(hf.config.vocab_size)[3]
    out = llm.generate([p], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, p, 8)


def test_preemption_keeps_greedy_output(tmp_path):
    """A cache too small for all requests at once forces preemption and recompute; tokens must not change."""
    hf = save_hf_model("llama", tmp_path)
    ps = prompts(hf.config.vocab_size)
    small = LLM(device="cpu", model=str(tmp_path), block_size=4, kv_cache_blocks=12)
    outs = small.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert small.engine.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, NEW_TOKENS)
    assert small.engine.cache.allocator.num_used == 0


def test_fused_projections_alias_the_layer_weights(tmp_path):
    """q/k/v (and Llama's gate/up) run as one GEMM over a matrix their own weights are views of:
    loading fills the fused matrix, state dicts keep the per-layer keys, and a model moved after
    loading (the views no longer alias) falls back to the separate layers with the same result."""
    hf = save_hf_model("llama", tmp_path)
    llm = LLM(device="cpu", model=str(tmp_path), block_size=4, dtype="float32")
    attn, mlp = llm.model.layers[0].self_attn, llm.model.layers[0].mlp
    assert attn.qkv.weight is not None and mlp.gate_up.weight is not None  # fused by the loader
    assert attn.k_proj.weight.data_ptr() == attn.qkv.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    assert torch.equal(attn.qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    ref = hf.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(attn.k_proj.weight, ref)
    assert not any("qkv" in k or "gate_up" in k for k in llm.model.state_dict())
    x = torch.randn(3, hf.config.hidden_size)
    fused = [t.clone() for t in attn.qkv(x)]
    moved = llm.model.to(torch.float64).to(torch.float32)  # new storage for every parameter
    separate = attn.qkv(x)
    assert moved.layers[0].self_attn.q_proj.weight.data_ptr() != attn.qkv.weight.data_ptr()
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)
