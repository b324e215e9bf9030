"""Tiny HF transformers models with random weights, saved as real checkpoints (the test oracle)."""
from __future__ import annotations

import torch
import transformers as T

TINY = {
    "gpt2": lambda: T.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=0, eos_token_id=1),
    "opt": lambda: T.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
                               bos_token_id=2, eos_token_id=2, pad_token_id=1),
    # GELU instead of ReLU (fc1 then runs without the fused activation).
    "opt-gelu": lambda: T.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
                                    activation_function="gelu", bos_token_id=2, eos_token_id=2, pad_token_id=1),
    # OPT-350m style: post-LayerNorm and projected embeddings.
    "opt-postln": lambda: T.OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=32,
                                      do_layer_norm_before=False, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    # 6 heads: ALiBi slopes for a non-power-of-two head count.
    "bloom": lambda: T.BloomConfig(vocab_size=512, hidden_size=96, n_layer=2, n_head=6,
                                   bos_token_id=1, eos_token_id=2),
    "llama": lambda: T.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}

_LLAMA = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
_GPT2 = dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=1)
_OPT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
            max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)
# Every variant of a family's HF config that changes the forward pass (docs/models.md).
VARIANTS = {
    "gpt2-untied": lambda: T.GPT2Config(**_GPT2, tie_word_embeddings=False),
    "gpt2-layer-scaled": lambda: T.GPT2Config(**_GPT2, scale_attn_by_inverse_layer_idx=True,
                                              reorder_and_upcast_attn=True, activation_function="gelu_fast"),
    "gpt2-unscaled": lambda: T.GPT2Config(**_GPT2, scale_attn_weights=False, activation_function="relu"),
    "opt-no-bias-no-affine": lambda: T.OPTConfig(**_OPT, enable_bias=False, layer_norm_elementwise_affine=False),
    "opt-no-final-norm": lambda: T.OPTConfig(**_OPT, _remove_final_layer_norm=True, tie_word_embeddings=False),
    "bloom-postln-untied": lambda: T.BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4,
                                                 apply_residual_connection_post_layernorm=True,
                                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama-tied-biases": lambda: T.LlamaConfig(**_LLAMA, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                               hidden_act="gelu_pytorch_tanh"),
    "llama-head-dim": lambda: T.LlamaConfig(**_LLAMA, head_dim=24),  # head_dim != hidden / heads, no CUDA kernel
    "llama-head-dim-32": lambda: T.LlamaConfig(**_LLAMA, head_dim=32),  # != hidden / heads, the CUDA kernel's
    "llama3-rope": lambda: T.LlamaConfig(**_LLAMA, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-linear-rope": lambda: T.LlamaConfig(**_LLAMA, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                         "factor": 4.0}),
    "qwen2": lambda: T.Qwen2Config(**_LLAMA, tie_word_embeddings=True),
    # A window of 8 keys on layer 1 only (max_window_layers=1): prompts and outputs run past it.
    "qwen2-window": lambda: T.Qwen2Config(**_LLAMA, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "mistral-window": lambda: T.MistralConfig(**_LLAMA, sliding_window=8),
}
MODELS = {**TINY, **VARIANTS}


def make_hf_model(name: str, seed: int = 0):
    cfg = MODELS[name]()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    # Random everything (biases and norms too), so a wrongly mapped weight cannot hide.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in n or "ln" in n):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save_hf_model(name: str, path, seed: int = 0, safe: bool = True):
    model = make_hf_model(name, seed)
    if safe:
        model.save_pretrained(path)
    else:  # the legacy pickle-free-to-read torch format (transformers 5 writes only safetensors)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), f"{path}/pytorch_model.bin")
    return model


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def assert_prefill_logits_close(llm, hf, prompts) -> None:
    """The last prompt token's logits of our engine (one process) and of HF, fp32 tolerances."""
    from dejavu import SamplingParams

    engine = llm.engine
    for p in prompts:
        seq = engine.add_request(p, SamplingParams(max_tokens=1))
        batch, is_prefill = engine.scheduler.schedule()
        assert is_prefill and batch == [seq]
        ours = engine.runner.run(batch, True)[0]
        torch.testing.assert_close(ours, hf(torch.tensor([p])).logits[0, -1].float(), rtol=1e-4, atol=1e-4)
        engine.scheduler.finish(seq, "abort")
