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


def make_hf_model(name: str, seed: int = 0):
    cfg = TINY[name]()
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
