"""One model configuration for every family, converted from and to HF transformers configs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("gpt2", "opt", "bloom", "llama")


class ModelError(ValueError):
    """A model spec, file or config that cannot be used; the message names the problem."""


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0
    # BLOOM
    residual_post_ln: bool = False
    # GPT-2: attention scores scaled by 1/sqrt(head_dim) (scale_attn_weights) and by 1/(layer + 1)
    attn_scale: bool = True
    scale_by_layer: bool = False
    # OPT: biases of the linear layers, LayerNorm weights, the final LayerNorm
    linear_bias: bool = True
    norm_affine: bool = True
    final_norm: bool = True
    # Llama family (Llama, Mistral, Qwen2): biases, RoPE and its scaling, sliding window
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # RoPE scaling: None, or {"rope_type": "linear" | "llama3", "factor": ..., and for llama3
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    sliding_window: int = 0          # keys a query sees, itself included (0: all)
    window_layers: list[bool] | None = None  # which layers use the window (None: all)
    hf_model_type: str = ""          # the HF family this config came from (llama, mistral, qwen2, ...)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ModelError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if not self.hf_model_type:
            self.hf_model_type = self.arch
        if not self.do_layer_norm_before:
            self.final_norm = False  # OPT: post-LN models have no final LayerNorm
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if not self.word_embed_proj_dim:
            self.word_embed_proj_dim = self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ModelError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"model config: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.window_layers is not None and len(self.window_layers) != self.num_layers:
            raise ModelError(f"model config: {len(self.window_layers)} layer types for {self.num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """From a transformers config or a config.json dict: every field honoured or refused
        (models/hf_config.py)."""
        from .hf_config import from_hf

        return from_hf(hf)

    def to_hf(self):
        """A transformers config describing the same model (random models and HF oracles)."""
        from .hf_config import to_hf

        return to_hf(self)

    def layer_window(self, index: int) -> int:
        """The sliding attention window of layer `index` (0: full attention)."""
        if not self.sliding_window:
            return 0
        return self.sliding_window if self.window_layers is None or self.window_layers[index] else 0
