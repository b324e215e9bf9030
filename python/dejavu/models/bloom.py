"""BLOOM: ALiBi instead of positions, embedding LayerNorm, fused per-head QKV, GELU MLP."""
from __future__ import annotations

from torch import nn

from .base import DecoderLM
from .layers import Linear, activation, alibi_slopes, paged_attention


class BloomAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.query_key_value = Linear(cfg.hidden_size, 3 * self.h * self.d)
        self.dense = Linear(self.h * self.d, cfg.hidden_size)
        # A plain attribute (never a weight, never on meta): one slope per head.
        self._slopes = alibi_slopes(self.h)

    def slopes(self, device):
        if self._slopes.device != device:
            self._slopes = self._slopes.to(device)
        return self._slopes

    def forward(self, x, positions, meta, cache):
        n = x.shape[0]
        # BLOOM interleaves q, k, v per head: [N, H, 3, D].
        q, k, v = self.query_key_value(x).view(n, self.h, 3, self.d).unbind(2)
        o = paged_attention(q, k, v, cache, meta, scale=self.d ** -0.5, alibi_slopes=self.slopes(x.device))
        return self.dense(o.reshape(n, -1))


class BloomBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.post_ln_residual = cfg.residual_post_ln
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.activation)

    def forward(self, h, positions, meta, cache):
        ln = self.input_layernorm(h)
        residual = ln if self.post_ln_residual else h
        h = residual + self.self_attention(ln, positions, meta, cache)
        ln = self.post_attention_layernorm(h)
        residual = ln if self.post_ln_residual else h
        return residual + self.mlp.dense_4h_to_h(self.act(self.mlp.dense_h_to_4h(ln)))


class Bloom(DecoderLM):
    embedding_key = "word_embeddings.weight"
    def __init__(self, cfg, layer_range=None):
        super().__init__(cfg, layer_range)
        if self.is_first:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if self.is_last:
            self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def make_layer(self, index):
        return BloomBlock(self.cfg)

    def embed(self, ids, positions):
        return self.word_embeddings_layernorm(self.word_embeddings(ids))

    def final(self, h):
        return self.ln_f(h)

    @staticmethod
    def hf_key(name):
        name = name.removeprefix("transformer.")
        if name.startswith("h."):
            name = "layers." + name[2:]
        return name, False
