"""Roofline profiles for hardware we cannot borrow (`dejavu profile --analytic GPU`).

Stage times from a model's exact shapes and a device's datasheet: prefill is compute-bound
(2 x parameters x tokens FLOPs at a sustained fraction of peak), decode is memory-bound (read the
stage's weights and the microbatch's KV at a sustained fraction of HBM bandwidth) plus a fixed
per-step launch cost. A "machine" may hold several GPUs running the stage tensor-parallel (the
paper's Appendix B setups): its FLOPs, bandwidth and memory add up. Good for the planner's
qualitative questions (which split, does disaggregation or swapping pay); measure real hardware
with `dejavu profile` for numbers.
"""
from __future__ import annotations

from .model import Fit, PlanError, Profile

# fp16 dense tensor-core peak (FLOP/s), HBM bytes/s, memory bytes, host link bytes/s (datasheets)
GPUS = {
    "a100-80gb": (312e12, 2.0e12, 80 * 2**30, 25e9),
    "a100-40gb": (312e12, 1.55e12, 40 * 2**30, 25e9),
    "v100-16gb": (125e12, 0.9e12, 16 * 2**30, 12e9),
    "h100-pcie": (756e12, 2.0e12, 80 * 2**30, 50e9),
    "h100-sxm": (989e12, 3.35e12, 80 * 2**30, 50e9),
}
COMPUTE_EFF, MEMORY_EFF, STEP_S = 0.5, 0.7, 30e-6


def analytic_profile(model: str, gpu: str, gpus_per_machine: int = 1, dtype_bytes: int = 2,
                     network_bytes_per_s: float = 12.5e9) -> Profile:
    from ..models import build_model
    from ..models.loader import resolve

    import torch

    if gpu not in GPUS:
        raise PlanError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPUS))}")
    if gpus_per_machine <= 0:
        raise PlanError(f"--gpus-per-machine must be > 0, got {gpus_per_machine}")
    flops, bw, mem, pcie = GPUS[gpu]
    g = gpus_per_machine
    cfg = resolve(model).config
    with torch.device("meta"):
        full = build_model(cfg, None)
        layer = build_model(cfg, (0, 1)).layers  # one decoder layer, without embeddings or head
    L = cfg.num_layers
    n_all = sum(p.numel() for p in full.parameters())
    n_layer = sum(p.numel() for p in layer.parameters())
    kv_tok_layer = 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    f, b_ = flops * g * COMPUTE_EFF, bw * g * MEMORY_EFF

    head_params = cfg.vocab_size * cfg.hidden_size

    def stage(layers: int, head: bool) -> tuple[Fit, Fit]:
        params = n_layer * layers
        hp = head_params if head else 0
        # prefill: a = launch + head weights, c = head per sequence (last token only), d = per prompt
        # token (2 FLOPs per parameter), e = attention (4 h per token pair)
        prompt = Fit(a=STEP_S * layers + hp * dtype_bytes / b_, c=2 * hp / f, d=2 * params / f,
                     e=4 * cfg.hidden_size * layers / f)
        # decode: read the weights once per step, each sequence's KV once per token of context
        token = Fit(a=STEP_S * layers + (params + hp) * dtype_bytes / b_, c=2 * (params + hp) / f,
                    d=kv_tok_layer * layers / b_)
        return prompt, token

    p1, t1 = stage(1, False)
    pl, tl = stage(1, True)
    pa, ta = stage(L, True)
    return Profile(model=model, device=f"{g}x{gpu}", num_layers=L, weight_bytes=int(n_all * dtype_bytes),
                   kv_bytes_per_token=kv_tok_layer * L, prompt_one=p1, prompt_all=pa, token_one=t1, token_all=ta,
                   prompt_last=pl, token_last=tl,
                   pcie_bytes_per_s=pcie * g, kv_link_bytes_per_s=network_bytes_per_s, card=f"{g}x{gpu} (roofline)",
                   dtype="float16" if dtype_bytes == 2 else f"{dtype_bytes} bytes", memory_bytes=mem * g,
                   admit_blocks_stage=False)
