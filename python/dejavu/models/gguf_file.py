"""Reading GGUF files (llama architecture): config from metadata, tensors dequantized to fp32.

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


def gguf_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF file {path}: architecture {arch!r} is not supported (only 'llama')")
    need = lambda k: _required(reader, f"llama.{k}", path)  # noqa: E731
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else 0)
    heads = int(need("attention.head_count"))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch="llama", vocab_size=int(vocab), hidden_size=int(need("embedding_length")),
        num_layers=int(need("block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        intermediate_size=int(need("feed_forward_length")), max_position=int(need("context_length")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), activation="silu",
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        attention_bias="blk.0.attn_q.bias" in names)


def _required(reader, key, path):
    v = _field(reader, key)
    if v is None:
        raise ModelError(f"GGUF file {path} lacks metadata {key!r}")
    return v


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, cfg: ModelConfig, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our global key, fp32 tensor), one tensor at a time (no full copy held)."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        m = _BLK.match(t.name)
        if m:
            sub = _BLOCK_NAMES.get(m.group(2))
            key = f"layers.{m.group(1)}.{sub}" if sub else None
        else:
            key = _TOP_NAMES.get(t.name)
        if key is None:
            if t.name.startswith("rope_freqs"):
                raise ModelError(f"GGUF file {path}: rope frequency factors are not supported")
            continue
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
        yield key, torch.from_numpy(w)


def open_gguf(path: str):
    reader = _open(path)
    cfg = gguf_config(reader, path)
    return cfg, gguf_tensors(reader, cfg, path)
