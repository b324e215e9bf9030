"""Token selection: greedy, temperature, top-k, top-p, with per-(seed, position) randomness.

Randomness never comes from a process-wide or per-batch generator. A sampled token is the
Gumbel-max race argmax_v(logit_v / T + g_v) over the top-k / top-p candidates, where the noise
g_v is a counter-based draw: a keyed hash of (request seed, position, token id). It is computed
the same way for one row or many, on the CPU or on a GPU, so batching, preemption, a pipeline or
a recovery on another worker cannot change what a seeded request samples. And since the race
compares scores rather than walking a cumulative distribution, tiny differences in the logits
(another batch size's kernels) change the token only when two candidates' noisy scores tie that
closely.
"""
from __future__ import annotations

import torch

from ..sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1
_M32 = 0xFFFFFFFF


def position_seed(seed: int, position: int) -> int:
    """The 63-bit key of one token's draw: a mix of the request's seed and the token's position."""
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 31
    return (x * 0x94D049BB133111EB) & _MASK64


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xorshift-multiply, 'lowbias32' constants): a bijection."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float64 in (0, 1): row i, column v is a hash of (keys[i], v). `keys`: [B] int64
    position_seed values."""
    v = torch.arange(vocab, dtype=torch.int64, device=keys.device).unsqueeze(0)
    k = keys.unsqueeze(1)
    h = _mix32(_mix32(v ^ (k & _M32)) ^ (k >> 32))
    return (h.double() + 0.5) * (1.0 / 2**32)


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniforms(keys, vocab)))


def _candidates(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the top-k tokens, then of those the smallest prefix (by probability, ties by
    token id) whose probability reaches top_p. top_k <= 0: no top-k cut."""
    probs = torch.softmax(scaled, dim=-1)
    sp, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(sp.shape[1], device=sp.device).unsqueeze(0)
    before = torch.cumsum(sp, dim=-1) - sp  # probability of the tokens ranked above
    keep = (before < top_p.unsqueeze(1)) | (rank == 0)
    keep &= (top_k.unsqueeze(1) <= 0) | (rank < top_k.unsqueeze(1))
    return torch.zeros_like(keep).scatter_(1, order, keep)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                positions: list[int]) -> torch.Tensor:
    """[B] int64 on the logits' device: each (non-greedy) row's token by the keyed Gumbel race."""
    dev = logits.device
    scaled = logits.double() / torch.tensor([p.temperature for p in params], dtype=torch.float64,
                                            device=dev).unsqueeze(1)
    filt = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    if filt:
        sub = scaled[filt]
        keep = _candidates(sub, torch.tensor([params[i].top_k for i in filt], device=dev),
                           torch.tensor([float(params[i].top_p) for i in filt], dtype=torch.float64, device=dev))
        scaled[filt] = sub.masked_fill(~keep, float("-inf"))
    keys = torch.tensor([position_seed(s, p) for s, p in zip(seeds, positions)], dtype=torch.int64, device=dev)
    return torch.argmax(scaled + gumbel(keys, scaled.shape[1]), dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           banned: list[list[int]]) -> list[int]:
    """logits: [B, V] float32. banned[i]: token ids row i may not pick now (e.g. EOS before min_tokens).
    Greedy rows take the argmax; the others sample (sample_rows), each by its own (seed, position)."""
    for i, ids in enumerate(banned):
        if ids:
            logits[i, ids] = float("-inf")
    tokens = torch.argmax(logits, dim=-1)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        tokens[rand] = sample_rows(logits[rand], [params[i] for i in rand], [seeds[i] for i in rand],
                                   [positions[i] for i in rand])
    return tokens.tolist()
