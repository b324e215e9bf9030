"""GPT-2: learned positions, pre-LayerNorm, fused QKV, GELU MLP, tied LM head."""
from __future__ import annotations

from torch import nn

from .. import kernels
from .base import DecoderLM, PreNormBlock
from .layers import Linear, activation, paged_attention


class GPT2Attention(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        # scale_attn_weights and scale_attn_by_inverse_layer_idx, as HF applies them
        self.scale = (self.d ** -0.5 if cfg.attn_scale else 1.0) / (index + 1 if cfg.scale_by_layer else 1)
        self.c_attn = Linear(cfg.hidden_size, 3 * self.h * self.d)
        self.c_proj = Linear(self.h * self.d, cfg.hidden_size)

    def forward(self, x, positions, meta, cache):
        q, k, v = self.c_attn(x).view(x.shape[0], 3, self.h, self.d).unbind(1)
        o = paged_attention(q, k, v, cache, meta, scale=self.scale)
        return self.c_proj(o.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.activation)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(PreNormBlock):
    def __init__(self, cfg, index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, index)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    @property
    def input_norm(self):
        return self.ln_1

    def body(self, h, x, positions, meta, cache):
        h, x = kernels.add_norm(h, self.attn(x, positions, meta, cache), self.ln_2)
        return h, self.mlp(x)


class GPT2(DecoderLM):
    embedding_key = "wte.weight"
    def __init__(self, cfg, layer_range=None):
        super().__init__(cfg, layer_range)
        if self.is_first:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.wpe = nn.Embedding(cfg.max_position, cfg.hidden_size)
        if self.is_last:
            self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def make_layer(self, index):
        return GPT2Block(self.cfg, index)

    def embed(self, ids, positions):
        return self.wte(ids) + self.wpe(positions)

    def embed_parts(self, ids, positions):
        return self.wte(ids), self.wpe(positions)

    @property
    def final_norm(self):
        return self.ln_f

    def final(self, h):
        return self.ln_f(h)

    NON_WEIGHTS = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers

    @classmethod
    def hf_key(cls, name):
        name = name.removeprefix("transformer.")
        if name.endswith(cls.NON_WEIGHTS):
            return None, False
        if name.startswith("h."):
            name = "layers." + name[2:]
        # HF GPT-2 uses Conv1D, whose weight is [in, out]: transpose into nn.Linear's [out, in].
        transpose = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        return name, transpose
