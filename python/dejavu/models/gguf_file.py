"""Reading GGUF files (llama architecture): config from metadata, tensors dequantized one at a
time into the target dtype. Every metadata key of the architecture and every tensor is accounted
for: what we cannot honour (RoPE scaling types, partial rotary, experts, unknown tensors) is refused.

llama.cpp's converter permutes the rows of Q and K so that its RoPE kernel can rotate adjacent
pairs; we undo that permutation to get HF's rotate-half layout back.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig, ModelError

_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _open(path: str):
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise ModelError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise ModelError(f"cannot read GGUF file {path}: {e}") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


# llama.* metadata keys read below; any other llama.* key is refused by name.
_LLAMA_KEYS = {"vocab_size", "embedding_length", "block_count", "attention.head_count", "attention.head_count_kv",
               "feed_forward_length", "context_length", "attention.layer_norm_rms_epsilon", "rope.freq_base",
               "rope.dimension_count", "attention.key_length", "attention.value_length", "rope.scaling.type",
               "rope.scaling.factor", "expert_count", "expert_used_count", "attention.sliding_window"}


def gguf_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF file {path}: architecture {arch!r} is not supported (only 'llama')")
    unknown = sorted(k for k in reader.fields if k.startswith("llama.") and k[len("llama."):] not in _LLAMA_KEYS)
    if unknown:
        raise ModelError(f"GGUF file {path}: metadata {', '.join(unknown)} not understood; refusing the model "
                         "rather than risking wrong output")
    need = lambda k: _required(reader, f"llama.{k}", path)  # noqa: E731
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else 0)
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        v = _field(reader, f"llama.{key}")
        if v is not None and int(v) != head_dim:
            raise ModelError(f"GGUF file {path}: llama.{key}={v} differs from the head size {head_dim} "
                             "(partial rotary or uneven heads are not supported)")
    if int(_field(reader, "llama.expert_count", 0) or 0) > 0:
        raise ModelError(f"GGUF file {path}: llama.expert_count > 0 (mixture of experts) is not supported")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ModelError(f"GGUF file {path}: llama.rope.scaling.type={scaling!r} is not supported (none, linear)")
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    qkv_bias = "blk.0.attn_q.bias" in names
    return ModelConfig(
        arch="llama", vocab_size=int(vocab), hidden_size=hidden,
        num_layers=int(need("block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(need("feed_forward_length")), max_position=int(need("context_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), activation="silu",
        rope_scaling=({"rope_type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor", 1.0))}
                      if scaling == "linear" else None),
        sliding_window=int(_field(reader, "llama.attention.sliding_window", 0) or 0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        qkv_bias=qkv_bias, o_bias="blk.0.attn_output.bias" in names)


def _required(reader, key, path):
    v = _field(reader, key)
    if v is None:
        raise ModelError(f"GGUF file {path} lacks metadata {key!r}")
    return v


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _key(name: str) -> str | None:
    """Our global key of GGUF tensor `name`, None if it has no place in the model."""
    m = _BLK.match(name)
    if m:
        sub = _BLOCK_NAMES.get(m.group(2))
        return f"layers.{m.group(1)}.{sub}" if sub else None
    return _TOP_NAMES.get(name)


def gguf_tensors(reader, cfg: ModelConfig, path: str,
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our global key, tensor in `dtype`), one tensor at a time (no full copy held)."""
    from gguf.quants import dequantize

    unused = [t.name for t in reader.tensors if _key(t.name) is None]
    if unused:
        raise ModelError(f"GGUF file {path}: tensor(s) {', '.join(unused[:8])} have no place in the model "
                         "(rope frequency factors, QK norms, ... are not supported); refusing it")
    for t in reader.tensors:
        key = _key(t.name)
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"GGUF file {path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
            w = _unpermute(w, cfg.num_heads)
        elif key.endswith("k_proj.weight") or key.endswith("k_proj.bias"):
            w = _unpermute(w, cfg.num_kv_heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # a view of the memory-mapped file
            w = w.copy()
        yield key, torch.from_numpy(w).to(dtype)


def open_gguf(path: str, dtype: torch.dtype = torch.float32):
    reader = _open(path)
    cfg = gguf_config(reader, path)
    return cfg, gguf_tensors(reader, cfg, path, dtype)
