"""Named configurations for `random:<name>` models (real shapes, random weights)."""
from __future__ import annotations

from .config import ModelConfig, ModelError

_GPT2 = dict(arch="gpt2", vocab_size=50257, max_position=1024, bos_token_id=50256, eos_token_ids=[50256],
             activation="gelu_new")
_OPT = dict(arch="opt", vocab_size=50272, max_position=2048, bos_token_id=2, eos_token_ids=[2], activation="relu")
_BLOOM = dict(arch="bloom", vocab_size=250880, max_position=2048, bos_token_id=1, eos_token_ids=[2],
              activation="gelu_tanh")
_LLAMA = dict(arch="llama", vocab_size=49152, max_position=2048, bos_token_id=1, eos_token_ids=[2],
              activation="silu", norm_eps=1e-5, tie_word_embeddings=True)


def _cfg(base, hidden, layers, heads, inter, **kw):
    d = dict(base, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
             intermediate_size=inter)
    d.update(kw)
    return d


NAMED_CONFIGS: dict[str, dict] = {
    "gpt2": _cfg(_GPT2, 768, 12, 12, 3072),
    "gpt2-medium": _cfg(_GPT2, 1024, 24, 16, 4096),
    "gpt2-tiny": _cfg(_GPT2, 64, 2, 4, 256),
    "opt-125m": _cfg(_OPT, 768, 12, 12, 3072),
    "opt-1.3b": _cfg(_OPT, 2048, 24, 32, 8192),
    "opt-6.7b": _cfg(_OPT, 4096, 32, 32, 16384),
    "opt-13b": _cfg(_OPT, 5120, 40, 40, 20480),
    "opt-30b": _cfg(_OPT, 7168, 48, 56, 28672),
    "opt-66b": _cfg(_OPT, 9216, 64, 72, 36864),
    "opt-tiny": _cfg(_OPT, 64, 2, 4, 256),
    "bloom-560m": _cfg(_BLOOM, 1024, 24, 16, 4096),
    "bloom-176b": _cfg(_BLOOM, 14336, 70, 112, 57344),
    "bloom-tiny": _cfg(_BLOOM, 64, 2, 4, 256, vocab_size=1024),
    "llama-tiny": _cfg(_LLAMA, 128, 4, 4, 384, num_kv_heads=2),
    "smollm2-135m": _cfg(_LLAMA, 576, 30, 9, 1536, num_kv_heads=3, max_position=8192, rope_theta=100000.0),
}


def named_config(name: str) -> ModelConfig:
    try:
        return ModelConfig(**NAMED_CONFIGS[name])
    except KeyError:
        raise ModelError(f"unknown random model {name!r}; named configs: {', '.join(NAMED_CONFIGS)}") from None
