"""Token selection: greedy, temperature, top-k, top-p, with per-(seed, position) randomness.

Randomness never comes from a process-wide generator: each token's uniform draw is a function of
the request's seed and the token's position, so batching, preemption or a recovery on another
worker cannot change what a seeded request samples.
"""
from __future__ import annotations

import torch

from ..sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 31
    return (x * 0x94D049BB133111EB) & _MASK64


def uniform(seed: int, position: int) -> float:
    g = torch.Generator().manual_seed(position_seed(seed, position))
    return float(torch.rand((), generator=g, dtype=torch.float64))


def sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """logits: [V] float32 on any device, banned tokens already at -inf."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.double().cpu() / params.temperature
    probs, order = torch.sort(torch.softmax(x, -1), descending=True, stable=True)
    keep = probs.numel()
    if params.top_k > 0:
        keep = min(keep, params.top_k)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs[:keep], 0)
        keep = min(keep, int(torch.searchsorted(cum, torch.tensor(params.top_p, dtype=torch.float64))) + 1)
    probs = probs[:keep]
    cum = torch.cumsum(probs, 0)
    u = uniform(seed, position) * float(cum[-1])
    idx = min(int(torch.searchsorted(cum, torch.tensor(u, dtype=torch.float64), right=True)), keep - 1)
    return int(order[idx])


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           banned: list[list[int]]) -> list[int]:
    """logits: [B, V] float32. banned[i]: token ids row i may not pick now (e.g. EOS before min_tokens)."""
    for i, ids in enumerate(banned):
        if ids:
            logits[i, ids] = float("-inf")
    if all(p.greedy for p in params):
        return torch.argmax(logits, dim=-1).tolist()
    return [sample_row(logits[i], p, s, pos) for i, (p, s, pos) in enumerate(zip(params, seeds, positions))]
