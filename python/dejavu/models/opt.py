"""OPT: learned positions (offset 2), pre- or post-LayerNorm, ReLU MLP, optional projections."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import kernels
from .base import DecoderLM, PreNormBlock
from .layers import FusedLinears, Linear, activation, paged_attention

POSITION_OFFSET = 2  # OPT's learned positions start at index 2


class OPTAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        hs, inner, bias = cfg.hidden_size, self.h * self.d, cfg.linear_bias
        self.q_proj = Linear(hs, inner, bias=bias)
        self.k_proj = Linear(hs, inner, bias=bias)
        self.v_proj = Linear(hs, inner, bias=bias)
        self.out_proj = Linear(inner, hs, bias=bias)
        self.qkv = FusedLinears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, positions, meta, cache):
        return self.attend(self.qkv(x), positions, meta, cache)

    def attend(self, qkv, positions, meta, cache):
        """The attention after the q/k/v projection (qkv: its three outputs)."""
        return self.out_proj(self.attention(qkv, positions, meta, cache))

    def attention(self, qkv, positions, meta, cache):
        """attend without out_proj: the heads' outputs, [n, heads * head_dim]."""
        q, k, v = qkv
        n = q.shape[0]
        q, k, v = q.view(n, self.h, self.d), k.view(n, self.h, self.d), v.view(n, self.h, self.d)
        return paged_attention(q, k, v, cache, meta, scale=self.d ** -0.5).reshape(n, -1)


class OPTLayer(PreNormBlock):
    def __init__(self, cfg):
        super().__init__()
        self.pre_ln = self.deferrable = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.norm_affine)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.linear_bias)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.linear_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.norm_affine)
        self.act = activation(cfg.activation)
        self.relu = cfg.activation == "relu"  # fused into fc1 (kernels.linear)

    @property
    def input_norm(self):
        return self.self_attn_layer_norm

    def _mlp(self, x):
        return self.fc2(kernels.linear(x, self.fc1.weight, self.fc1.bias, relu=True) if self.relu
                        else self.act(self.fc1(x)))

    @property
    def input_projection(self):
        return self.self_attn.qkv

    def body(self, h, qkv, positions, meta, cache):
        a = self.self_attn.attend(qkv, positions, meta, cache)
        # The residual add, the norm and fc1 (with its ReLU): one kernel at decode sizes.
        h, x = kernels.add_norm_linear(h, a, self.final_layer_norm, self.fc1.weight, self.fc1.bias, relu=self.relu)
        return h, self.fc2(x if self.relu else self.act(x))

    def forward(self, h, positions, meta, cache):
        if self.pre_ln:
            return super().forward(h, positions, meta, cache)
        h = x = self.self_attn_layer_norm(h + self.self_attn(h, positions, meta, cache))
        return self.final_layer_norm(h + self._mlp(x))


class OPT(DecoderLM):
    def __init__(self, cfg, layer_range=None):
        super().__init__(cfg, layer_range)
        projected = cfg.word_embed_proj_dim != cfg.hidden_size
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
            self.embed_positions = nn.Embedding(cfg.max_position + POSITION_OFFSET, cfg.hidden_size)
            self.project_in = Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False) if projected else None
        if self.is_last:
            self.final_layer_norm = (nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.norm_affine)
                                     if cfg.final_norm else None)
            self.project_out = Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False) if projected else None
            self.lm_head = Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)

    def make_layer(self, index):
        return OPTLayer(self.cfg)

    def embed(self, ids, positions):
        x = self.embed_tokens(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self._positions(positions)

    def embed_parts(self, ids, positions):
        if self.project_in is not None:
            return self.embed(ids, positions), None
        return self.embed_tokens(ids), self._positions(positions)

    def _positions(self, positions):
        """The learned position embeddings: rows from POSITION_OFFSET on, looked up without adding
        the offset to the positions (one kernel fewer per step)."""
        return F.embedding(positions, self.embed_positions.weight[POSITION_OFFSET:])

    @property
    def final_norm(self):
        return self.final_layer_norm if self.project_out is None else None

    def final(self, h):
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h

    @staticmethod
    def hf_key(name):
        for prefix in ("model.decoder.", "decoder."):
            if name.startswith(prefix):
                return name[len(prefix):], False
        return name, False
