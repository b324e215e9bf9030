"""HF config.json <-> ModelConfig, with every field accounted for.

Each family's converter reads the fields it honours through `Fields`, and refuses by name a value
it cannot honour. After conversion, a field that no converter read and that is not NEUTRAL (fields
that never change the forward pass) is refused by name too: a serving system may refuse a model,
it must never serve one wrong. docs/models.md has the table of fields honoured and refused.
"""
from __future__ import annotations

import math
from typing import Any

from .config import ModelConfig, ModelError

# Fields that never change inference math: metadata, training-only settings (dropout, init),
# generation defaults (generation_config.json's job), and flags HF's own forward pass ignores.
NEUTRAL = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "_experts_implementation", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_bfloat16", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
    "chunk_size_feed_forward", "is_decoder", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "tf_legacy_loss",
    "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "initializer_range", "init_std", "gradient_checkpointing",
    "dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop", "embd_pdrop",
    "resid_pdrop", "summary_first_dropout", "layerdrop",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
# Per family: fields HF's own modelling code ignores for causal LM generation.
FAMILY_NEUTRAL = {
    "gpt2": {"n_ctx", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels"},
    "bloom": {"attention_softmax_in_fp32", "bias_dropout_fusion", "masked_softmax_fusion", "offset_alibi",
              "skip_bias_add", "skip_bias_add_qkv", "seq_length", "n_inner", "slow_but_exact", "pretraining_tp"},
    **{m: {"pretraining_tp"} for m in ("llama", "mistral", "qwen2")},  # split matmuls: numerics only
}
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "partial_rotary_factor"}


class Fields:
    """A config dict whose reads are recorded, so the fields nobody read can be refused."""

    def __init__(self, d: dict, family: str):
        self.d, self.family, self.read = d, family, set()

    def get(self, *names: str, default: Any = None) -> Any:
        """The first of `names` that is set (not None), else default."""
        self.read.update(names)
        for n in names:
            if self.d.get(n) is not None:
                return self.d[n]
        return default

    def need(self, *names: str) -> Any:
        v = self.get(*names)
        if v is None:
            raise ModelError(f"{self.family} config lacks field {names[0]!r}")
        return v

    def refuse(self, name: str, value: Any, why: str = "") -> ModelError:
        return ModelError(f"{self.family} config: {name}={value!r} is not supported{': ' + why if why else ''}")

    def only(self, name: str, allowed: tuple, default: Any) -> Any:
        v = self.get(name, default=default)
        if v not in allowed:
            raise self.refuse(name, v, f"supported: {', '.join(map(repr, allowed))}")
        return v

    def unread(self) -> list[str]:
        skip = NEUTRAL | FAMILY_NEUTRAL.get(self.family, set()) | self.read
        return sorted(k for k in self.d if k not in skip)


def from_hf(hf: Any) -> ModelConfig:
    """From a transformers PretrainedConfig or a config.json dict."""
    d = dict(hf) if isinstance(hf, dict) else hf.to_dict()
    mt = d.get("model_type")
    if mt is None and "rms_norm_eps" in d:
        mt = "llama"
    converters = {"gpt2": _gpt2, "opt": _opt, "bloom": _bloom, **{m: _llama for m in LLAMA_FAMILY}}
    if mt not in converters:
        raise ModelError(f"unsupported model_type {mt!r}; supported: {', '.join(converters)}")
    f = Fields(d, mt)
    _refuse_unservable(f)
    eos = f.get("eos_token_id")
    common = dict(bos_token_id=f.get("bos_token_id"),
                  eos_token_ids=[int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None])
    cfg = converters[mt](f, mt, common)
    left = f.unread()
    if left:
        raise ModelError(f"{mt} config field(s) {', '.join(left)} are not understood by DéjàVu; refusing the model "
                         "rather than risking wrong output (docs/models.md lists the fields honoured)")
    return cfg


def _refuse_unservable(f: Fields) -> None:
    q = f.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise ModelError(f"{f.family} config: quantization_config ({method}) is not supported; use an unquantized "
                         "checkpoint or a GGUF file")
    for flag in ("is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder"):
        if f.get(flag):
            raise f.refuse(flag, True, "only decoder-only models are served")
    if f.get("pruned_heads"):
        raise f.refuse("pruned_heads", f.d["pruned_heads"], "pruned attention heads")


def _activation(f: Fields, name: str, default: str) -> str:
    from .layers import ACTIVATIONS

    v = f.get(name, default=default)
    if v not in ACTIVATIONS:
        raise f.refuse(name, v, f"supported: {', '.join(ACTIVATIONS)}")
    return v


def _gpt2(f: Fields, mt: str, common: dict) -> ModelConfig:
    h = f.need("n_embd")
    f.get("reorder_and_upcast_attn")  # precision only: our attention accumulates in fp32 on every path
    return ModelConfig(arch="gpt2", vocab_size=f.need("vocab_size"), hidden_size=h, num_layers=f.need("n_layer"),
                       num_heads=f.need("n_head"), num_kv_heads=f.need("n_head"),
                       intermediate_size=f.get("n_inner", default=4 * h), max_position=f.need("n_positions"),
                       norm_eps=f.get("layer_norm_epsilon", default=1e-5),
                       activation=_activation(f, "activation_function", "gelu_new"),
                       attn_scale=bool(f.get("scale_attn_weights", default=True)),
                       scale_by_layer=bool(f.get("scale_attn_by_inverse_layer_idx", default=False)),
                       tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)), **common)


def _opt(f: Fields, mt: str, common: dict) -> ModelConfig:
    pre_ln = bool(f.get("do_layer_norm_before", default=True))
    removed = bool(f.get("_remove_final_layer_norm", default=False))
    return ModelConfig(arch="opt", vocab_size=f.need("vocab_size"), hidden_size=f.need("hidden_size"),
                       num_layers=f.need("num_hidden_layers"), num_heads=f.need("num_attention_heads"),
                       num_kv_heads=f.need("num_attention_heads"), intermediate_size=f.need("ffn_dim"),
                       max_position=f.need("max_position_embeddings"),
                       activation=_activation(f, "activation_function", "relu"), do_layer_norm_before=pre_ln,
                       word_embed_proj_dim=f.get("word_embed_proj_dim", default=f.d["hidden_size"]),
                       linear_bias=bool(f.get("enable_bias", default=True)),
                       norm_affine=bool(f.get("layer_norm_elementwise_affine", default=True)),
                       final_norm=pre_ln and not removed,
                       tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)), **common)


def _bloom(f: Fields, mt: str, common: dict) -> ModelConfig:
    h = f.need("hidden_size", "n_embed")
    n_head = f.need("n_head", "num_attention_heads")
    return ModelConfig(arch="bloom", vocab_size=f.need("vocab_size"), hidden_size=h,
                       num_layers=f.need("n_layer", "num_hidden_layers"), num_heads=n_head, num_kv_heads=n_head,
                       intermediate_size=4 * h, max_position=f.get("max_position_embeddings", default=2048),
                       norm_eps=f.get("layer_norm_epsilon", default=1e-5), activation="gelu_tanh",
                       residual_post_ln=bool(f.get("apply_residual_connection_post_layernorm", default=False)),
                       tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)), **common)


def _llama(f: Fields, mt: str, common: dict) -> ModelConfig:
    n_head, n_layer = f.need("num_attention_heads"), f.need("num_hidden_layers")
    max_pos = f.need("max_position_embeddings")
    theta, scaling = _rope(f, max_pos)
    qkv_bias = o_bias = mlp_bias = False
    window, window_layers = 0, None
    if mt == "llama":
        qkv_bias = o_bias = bool(f.get("attention_bias", default=False))
        mlp_bias = bool(f.get("mlp_bias", default=False))
    elif mt == "mistral":
        window = int(f.get("sliding_window", default=0))
    else:  # qwen2: q/k/v always carry biases; the window only where use_sliding_window and layer_types say
        qkv_bias = True
        if f.get("use_mrope"):
            raise f.refuse("use_mrope", True, "multimodal RoPE")
        size = int(f.get("sliding_window", default=0))  # set in every Qwen2 config, used only when enabled
        window = size if f.get("use_sliding_window", default=False) else 0
        first = f.get("max_window_layers", default=n_layer)
        types = f.get("layer_types", default=["sliding_attention" if i >= first else "full_attention"
                                              for i in range(n_layer)])
        bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
        if bad:
            raise f.refuse("layer_types", bad[0])
        window_layers = [t == "sliding_attention" for t in types]
    if window >= max_pos:
        window = 0  # a window no sequence can exceed is full attention
    if not window or (window_layers is not None and not any(window_layers)):
        window, window_layers = 0, None
    return ModelConfig(arch="llama", vocab_size=f.need("vocab_size"), hidden_size=f.need("hidden_size"),
                       num_layers=n_layer, num_heads=n_head, num_kv_heads=f.get("num_key_value_heads", default=n_head),
                       intermediate_size=f.need("intermediate_size"), max_position=max_pos,
                       head_dim=f.get("head_dim", default=0), norm_eps=f.get("rms_norm_eps", default=1e-6),
                       activation=_activation(f, "hidden_act", "silu"), rope_theta=float(theta), rope_scaling=scaling,
                       tie_word_embeddings=bool(f.get("tie_word_embeddings", default=False)), qkv_bias=qkv_bias,
                       o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=window, window_layers=window_layers,
                       hf_model_type=mt, **common)


def _rope(f: Fields, max_pos: int) -> tuple[float, dict | None]:
    """(theta, scaling) from rope_parameters (transformers 5) or rope_scaling + rope_theta (4.x)."""
    field = "rope_parameters" if f.d.get("rope_parameters") else "rope_scaling"
    p = f.get("rope_parameters", "rope_scaling", default={})
    if not isinstance(p, dict) or any(isinstance(v, dict) for v in p.values()):
        raise f.refuse(field, p, "one RoPE setting for all layers is supported")
    extra = sorted(set(p) - ROPE_KEYS)
    if extra:
        raise f.refuse(field, p, f"unknown RoPE parameter(s) {', '.join(extra)}")
    partial = p.get("partial_rotary_factor", f.get("partial_rotary_factor", default=1.0))
    if partial != 1.0:
        raise f.refuse("partial_rotary_factor", partial, "partial rotary embeddings")
    theta = p.get("rope_theta") or f.get("rope_theta", default=10000.0)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(p["factor"])}
    if kind == "llama3":
        orig = f.get("original_max_position_embeddings") or p.get("original_max_position_embeddings") or max_pos
        try:
            return theta, {"rope_type": "llama3", "factor": float(p["factor"]),
                           "low_freq_factor": float(p["low_freq_factor"]),
                           "high_freq_factor": float(p["high_freq_factor"]),
                           "original_max_position_embeddings": int(orig)}
        except KeyError as e:
            raise f.refuse(field, p, f"llama3 RoPE scaling needs {e}") from None
    raise f.refuse(f"{field}.rope_type", kind, "supported: default, linear, llama3")


def rope_inv_freq(cfg: ModelConfig):
    """RoPE inverse frequencies [head_dim / 2] in fp32, scaled as the config says (as HF computes them)."""
    import torch

    d = cfg.head_dim
    arange = torch.arange(0, d, 2, dtype=torch.int64, device="cpu")  # never on meta, even when built there
    inv = 1.0 / (cfg.rope_theta ** (arange.to(torch.float32) / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    factor, lo, hi, orig = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                            s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / hi) * ~(wavelen > orig / lo)
    return torch.where(medium, smoothed, scaled)


def to_hf(cfg: ModelConfig):
    """A transformers config describing the same model (random models and HF oracles)."""
    import transformers as T

    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos)
    if cfg.arch == "gpt2":
        return T.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                            n_head=cfg.num_heads, n_inner=cfg.intermediate_size, n_positions=cfg.max_position,
                            layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                            scale_attn_weights=cfg.attn_scale, scale_attn_by_inverse_layer_idx=cfg.scale_by_layer,
                            tie_word_embeddings=cfg.tie_word_embeddings, **ids)
    if cfg.arch == "opt":
        return T.OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
                           max_position_embeddings=cfg.max_position, activation_function=cfg.activation,
                           do_layer_norm_before=cfg.do_layer_norm_before, word_embed_proj_dim=cfg.word_embed_proj_dim,
                           enable_bias=cfg.linear_bias, layer_norm_elementwise_affine=cfg.norm_affine,
                           _remove_final_layer_norm=cfg.do_layer_norm_before and not cfg.final_norm,
                           tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=1, **ids)
    if cfg.arch == "bloom":
        return T.BloomConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, n_layer=cfg.num_layers,
                             n_head=cfg.num_heads, layer_norm_epsilon=cfg.norm_eps,
                             apply_residual_connection_post_layernorm=cfg.residual_post_ln,
                             tie_word_embeddings=cfg.tie_word_embeddings, **ids)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, hidden_act=cfg.activation, rope_parameters=rope,
                  tie_word_embeddings=cfg.tie_word_embeddings, **ids)
    if cfg.hf_model_type == "qwen2":
        layers = cfg.window_layers or [bool(cfg.sliding_window)] * cfg.num_layers
        return T.Qwen2Config(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                             layer_types=["sliding_attention" if w else "full_attention" for w in layers], **common)
    if cfg.hf_model_type == "mistral":
        return T.MistralConfig(sliding_window=cfg.sliding_window or None, **common)
    return T.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **common)
