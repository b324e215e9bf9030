"""BLOOM: ALiBi instead of positions, embedding LayerNorm, fused per-head QKV, GELU MLP."""
from __future__ import annotations

from torch import nn

from .base import DecoderLM
from .layers import Linear, RowLinear, activation, alibi_slopes, paged_attention


class BloomAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.query_key_value = Linear(cfg.hidden_size, 3 * self.h * self.d)
        self.dense = RowLinear(self.h * self.d, cfg.hidden_size)
        # A plain attribute (never a weight, never on meta): this shard's heads' slopes.
        all_slopes = alibi_slopes(cfg.num_heads * cfg.tp_size)
        self._slopes = all_slopes[cfg.tp_rank * self.h:(cfg.tp_rank + 1) * self.h].clone()

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
        self.mlp.dense_4h_to_h = RowLinear(cfg.intermediate_size, cfg.hidden_size)
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
    # query_key_value is laid out [heads, 3, head_dim]: a contiguous slice of rows is a slice of heads.
    TP_DIMS = {"query_key_value.weight": 0, "query_key_value.bias": 0, "self_attention.dense.weight": 1,
               "dense_h_to_4h.weight": 0, "dense_h_to_4h.bias": 0, "dense_4h_to_h.weight": 1}

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
