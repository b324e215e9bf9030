"""Llama: RoPE, grouped-query attention, RMSNorm, SwiGLU MLP. Also SmolLM2, Mistral (sliding
window) and Qwen2 (q/k/v biases, per-layer window): the same math, set by config fields."""
from __future__ import annotations

from torch import nn

from .base import DecoderLM, PreNormBlock
from .hf_config import rope_inv_freq
from .layers import FusedLinears, Linear, RMSNorm, activation, apply_rope, paged_attention, rope_cos_sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.layer_window(index)
        hs, bias = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = Linear(hs, self.h * self.d, bias=bias)
        self.k_proj = Linear(hs, self.kvh * self.d, bias=bias)
        self.v_proj = Linear(hs, self.kvh * self.d, bias=bias)
        self.o_proj = Linear(self.h * self.d, hs, bias=cfg.o_bias)
        self.qkv = FusedLinears(self.q_proj, self.k_proj, self.v_proj)
        self._inv_freq = rope_inv_freq(cfg)  # a plain attribute (never a weight, never on meta)

    def inv_freq(self, device):
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def forward(self, x, positions, meta, cache):
        return self.attend(self.qkv(x), positions, meta, cache)

    def attend(self, qkv, positions, meta, cache):
        """The attention after the q/k/v projection (qkv: its three outputs)."""
        q, k, v = qkv
        n = q.shape[0]
        q, k, v = q.view(n, self.h, self.d), k.view(n, self.kvh, self.d), v.view(n, self.kvh, self.d)
        cos, sin = rope_cos_sin(positions, self.inv_freq(q.device), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = paged_attention(q, k, v, cache, meta, scale=self.d ** -0.5, window=self.window)
        return self.o_proj(o.reshape(n, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hs, inter, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(hs, inter, bias=bias)
        self.up_proj = Linear(hs, inter, bias=bias)
        self.down_proj = Linear(inter, hs, bias=bias)
        self.act = activation(cfg.activation)
        self.gate_up = FusedLinears(self.gate_proj, self.up_proj)

    def forward(self, x):
        return self.down(*self.gate_up(x))

    def down(self, gate, up):
        return self.down_proj(self.act(gate) * up)


class LlamaLayer(PreNormBlock):
    def __init__(self, cfg, index):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    @property
    def input_norm(self):
        return self.input_layernorm

    @property
    def input_projection(self):
        return self.self_attn.qkv

    def body(self, h, qkv, positions, meta, cache):
        a = self.self_attn.attend(qkv, positions, meta, cache)
        h, (gate, up) = self.mlp.gate_up.after_add_norm(h, a, self.post_attention_layernorm)
        return h, self.mlp.down(gate, up)


class Llama(DecoderLM):
    NON_WEIGHTS = ("rotary_emb.inv_freq",)  # HF's RoPE buffer: computed from the config instead

    def __init__(self, cfg, layer_range=None):
        super().__init__(cfg, layer_range)
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def make_layer(self, index):
        return LlamaLayer(self.cfg, index)

    def embed(self, ids, positions):
        return self.embed_tokens(ids)

    @property
    def final_norm(self):
        return self.norm

    def final(self, h):
        return self.norm(h)

    @classmethod
    def hf_key(cls, name):
        if name.endswith(cls.NON_WEIGHTS):
            return None, False
        return name.removeprefix("model."), False
