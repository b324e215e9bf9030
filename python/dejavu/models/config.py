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
    # Llama
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    # Tensor parallelism: this shard's rank and the degree. Head and intermediate counts above are
    # then the shard's own (see shard()).
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ModelError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
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

    def shard(self, tp_rank: int, tp_size: int) -> "ModelConfig":
        """The config of one tensor-parallel shard: heads, KV heads and MLP width divided by tp_size."""
        if tp_size == 1:
            return self
        for name in ("num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) % tp_size:
                raise ModelError(f"tensor parallelism {tp_size} does not divide {name}={getattr(self, name)}")
        return dataclasses.replace(self, num_heads=self.num_heads // tp_size, num_kv_heads=self.num_kv_heads // tp_size,
                                   intermediate_size=self.intermediate_size // tp_size, tp_rank=tp_rank,
                                   tp_size=tp_size)

    def unsharded(self) -> "ModelConfig":
        if self.tp_size == 1:
            return self
        t = self.tp_size
        return dataclasses.replace(self, num_heads=self.num_heads * t, num_kv_heads=self.num_kv_heads * t,
                                   intermediate_size=self.intermediate_size * t, tp_rank=0, tp_size=1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """From a transformers PretrainedConfig (or a config.json dict)."""
        if isinstance(hf, dict):
            d = dict(hf)
        else:
            d = hf.to_dict()
        mt = d.get("model_type")
        eos = d.get("eos_token_id")
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        common = dict(bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids)
        if mt == "gpt2":
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if d.get(flag):
                    raise ModelError(f"gpt2 config: {flag}=True is not supported")
            if d.get("scale_attn_weights") is False:
                raise ModelError("gpt2 config: scale_attn_weights=False is not supported")
            h = d["n_embd"]
            return cls(arch="gpt2", vocab_size=d["vocab_size"], hidden_size=h, num_layers=d["n_layer"],
                       num_heads=d["n_head"], num_kv_heads=d["n_head"],
                       intermediate_size=d.get("n_inner") or 4 * h, max_position=d["n_positions"],
                       norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       activation=d.get("activation_function", "gelu_new"), tie_word_embeddings=True, **common)
        if mt == "opt":
            if d.get("enable_bias") is False or d.get("layer_norm_elementwise_affine") is False:
                raise ModelError("opt config: enable_bias=False / layer_norm_elementwise_affine=False not supported")
            return cls(arch="opt", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                       num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                       num_kv_heads=d["num_attention_heads"], intermediate_size=d["ffn_dim"],
                       max_position=d["max_position_embeddings"], activation=d.get("activation_function", "relu"),
                       do_layer_norm_before=d.get("do_layer_norm_before", True),
                       word_embed_proj_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
                       tie_word_embeddings=d.get("tie_word_embeddings", True), **common)
        if mt == "bloom":
            h = d.get("hidden_size") or d.get("n_embed")
            n_layer = d.get("n_layer") or d.get("num_hidden_layers")
            n_head = d.get("n_head") or d.get("num_attention_heads")
            return cls(arch="bloom", vocab_size=d["vocab_size"], hidden_size=h, num_layers=n_layer,
                       num_heads=n_head, num_kv_heads=n_head, intermediate_size=4 * h,
                       max_position=d.get("seq_length") or d.get("max_position_embeddings") or 2048,
                       norm_eps=d.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh",
                       residual_post_ln=bool(d.get("apply_residual_connection_post_layernorm", False)),
                       tie_word_embeddings=d.get("tie_word_embeddings", True), **common)
        if mt in ("llama", "mistral", "qwen2") or (mt is None and "rms_norm_eps" in d):
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
            if rope_type not in ("default", None):
                raise ModelError(f"llama config: rope type {rope_type!r} is not supported (only 'default')")
            theta = rope.get("rope_theta") or d.get("rope_theta") or 10000.0
            if d.get("sliding_window") and mt != "llama" and d.get("use_sliding_window", True):
                raise ModelError(f"{mt} config: sliding-window attention is not supported")
            n_head = d["num_attention_heads"]
            return cls(arch="llama", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                       num_layers=d["num_hidden_layers"], num_heads=n_head,
                       num_kv_heads=d.get("num_key_value_heads") or n_head,
                       intermediate_size=d["intermediate_size"], max_position=d["max_position_embeddings"],
                       head_dim=d.get("head_dim") or 0, norm_eps=d.get("rms_norm_eps", 1e-6),
                       activation=d.get("hidden_act", "silu"), rope_theta=float(theta),
                       tie_word_embeddings=d.get("tie_word_embeddings", False),
                       attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                       **common)
        raise ModelError(f"unsupported model_type {mt!r}; supported: gpt2, opt, bloom, llama")

    def to_hf(self):
        """A transformers config describing the same model (used for random models and HF oracles)."""
        import transformers as T

        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        if self.arch == "gpt2":
            return T.GPT2Config(vocab_size=self.vocab_size, n_embd=self.hidden_size, n_layer=self.num_layers,
                                n_head=self.num_heads, n_inner=self.intermediate_size, n_positions=self.max_position,
                                layer_norm_epsilon=self.norm_eps, activation_function=self.activation,
                                bos_token_id=self.bos_token_id, eos_token_id=eos)
        if self.arch == "opt":
            return T.OPTConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                               num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                               ffn_dim=self.intermediate_size, max_position_embeddings=self.max_position,
                               activation_function=self.activation, do_layer_norm_before=self.do_layer_norm_before,
                               word_embed_proj_dim=self.word_embed_proj_dim, tie_word_embeddings=self.tie_word_embeddings,
                               bos_token_id=self.bos_token_id, eos_token_id=eos, pad_token_id=1)
        if self.arch == "bloom":
            return T.BloomConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_layer=self.num_layers,
                                 n_head=self.num_heads, layer_norm_epsilon=self.norm_eps,
                                 apply_residual_connection_post_layernorm=self.residual_post_ln,
                                 tie_word_embeddings=self.tie_word_embeddings,
                                 bos_token_id=self.bos_token_id, eos_token_id=eos)
        return T.LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                             num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                             num_key_value_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
                             max_position_embeddings=self.max_position, head_dim=self.head_dim,
                             rms_norm_eps=self.norm_eps, hidden_act=self.activation, rope_theta=self.rope_theta,
                             tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
                             mlp_bias=self.mlp_bias, bos_token_id=self.bos_token_id, eos_token_id=eos)
