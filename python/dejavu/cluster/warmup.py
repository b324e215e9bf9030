"""A standby's warm-up: one layer of the model it holds (one of each kind where windowed and full
layers mix) runs a prefill, a prefill over a cached context and decode steps on its device before
any rank is given to it, so that a takeover's first steps do not pay for loading kernels and
creating library handles (docs/fault-tolerance.md, "Standbys hold weights")."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import torch

log = logging.getLogger("dejavu.standby")

BLOCK = 16


@torch.inference_mode()
def warm_up(cfg, device: torch.device, dtype: torch.dtype, tp: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Run a one-layer model of config `cfg` (a layer of each kind where windowed and full layers
    mix; embedding and head included, weights random; the shard `tp` = (rank, size) of it, without
    the all-reduce) through the shapes a stage sees; everything it allocates is freed again.
    Returns the last decode step's greedy tokens."""
    t0 = time.perf_counter()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        try:
            tokens = _run(cfg, device, dtype, tp)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # what the one-layer model and its cache took (freed on return)
    log.info("standby: warmed up on %s in %.2fs", device, time.perf_counter() - t0)
    return tokens


def _run(cfg, device: torch.device, dtype: torch.dtype, tp: tuple[int, int]) -> torch.Tensor:
    from ..engine.kv_cache import PagedKVCache
    from ..engine.model_runner import build_metadata
    from ..models.loader import skeleton

    kinds = sorted(set(cfg.window_layers)) if cfg.window_layers is not None else None  # a layer of each kind
    one = dataclasses.replace(cfg, num_layers=len(kinds) if kinds else 1, window_layers=kinds)
    model = skeleton(one, device, dtype, (0, one.num_layers), tp)
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    model.eval()
    seqs = 8
    cache = PagedKVCache(one.num_layers, 2 * seqs, BLOCK, one.num_kv_heads // tp[1], one.head_dim, dtype, device)

    def run(items):
        ids, pos, meta, last = build_metadata(items, BLOCK, device)
        h = model(ids, pos, meta, cache.tensor)
        return model.compute_logits(h[last]).argmax(-1)

    blocks = [[2 * i, 2 * i + 1] for i in range(seqs)]
    run([([1] * 20, 0, blocks[i]) for i in range(seqs)])            # a fresh prefill
    run([([1] * 3, 20, blocks[i]) for i in range(seqs)])            # over a cached context
    for n in (1, seqs):                                             # decode steps
        tokens = run([([1], 23, blocks[i]) for i in range(n)]).cpu()
    return tokens
