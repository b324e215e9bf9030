"""Token selection: logit bias and penalties, then greedy, or temperature, min-p, top-k, top-p
with per-(seed, position) randomness; logprobs of the raw distribution.

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
    mp = [i for i, p in enumerate(params) if p.min_p > 0]
    if mp:  # min_p: drop tokens less likely than min_p times the likeliest (after temperature)
        probs = torch.softmax(scaled[mp], dim=-1)
        floor = torch.tensor([params[i].min_p for i in mp], dtype=torch.float64, device=dev).unsqueeze(1)
        scaled[mp] = scaled[mp].masked_fill(probs < floor * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    filt = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    if filt:
        sub = scaled[filt]
        keep = _candidates(sub, torch.tensor([params[i].top_k for i in filt], device=dev),
                           torch.tensor([float(params[i].top_p) for i in filt], dtype=torch.float64, device=dev))
        scaled[filt] = sub.masked_fill(~keep, float("-inf"))
    keys = torch.tensor([position_seed(s, p) for s, p in zip(seeds, positions)], dtype=torch.int64, device=dev)
    return torch.argmax(scaled + gumbel(keys, scaled.shape[1]), dim=-1)


def _penalize(row: torch.Tensor, p: SamplingParams, seen: list[int], num_prompt: int) -> None:
    """In place on one row of logits: repetition penalty over every token so far (HF's
    RepetitionPenaltyLogitsProcessor), then frequency and presence penalties over the output tokens."""
    if p.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)), dtype=torch.int64, device=row.device)
        x = row[ids]
        row[ids] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    out = seen[num_prompt:]
    if (p.frequency_penalty or p.presence_penalty) and out:
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64, device=row.device),
                                minlength=row.shape[0])[:row.shape[0]].to(row.dtype)
        row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty


def pick(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
         banned: list[list[int]], seen: list[tuple[list[int], int] | None] | None = None):
    """(tokens, logprobs): each row's token and, for rows whose params ask for logprobs, a
    [token logprob, [[id, logprob], ...top k]] entry (None for the others). logits: [B, V] float32,
    changed in place. seen[i]: (token ids so far, how many of them are the prompt), needed by rows
    with a penalty. Logprobs are of the raw logits, before bans, bias, penalties and temperature."""
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = torch.log_softmax(logits[want].float(), dim=-1) if want else None
    for i, ids in enumerate(banned):
        if ids:
            logits[i, ids] = float("-inf")
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if p.penalized and seen is not None and seen[i] is not None:
            _penalize(logits[i], p, *seen[i])
    tokens = torch.argmax(logits, dim=-1)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        tokens[rand] = sample_rows(logits[rand], [params[i] for i in rand], [seeds[i] for i in rand],
                                   [positions[i] for i in rand])
    out = tokens.tolist()
    lps: list = [None] * len(params)
    for j, i in enumerate(want):
        k = params[i].logprobs
        top = torch.topk(raw[j], k) if k else None
        lps[i] = [float(raw[j, out[i]]),
                  [[t, v] for t, v in zip(top.indices.tolist(), top.values.tolist())] if k else []]
    return out, lps


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
           banned: list[list[int]], seen: list[tuple[list[int], int] | None] | None = None) -> list[int]:
    """logits: [B, V] float32. banned[i]: token ids row i may not pick now (e.g. EOS before min_tokens).
    Greedy rows take the argmax of the processed logits; the others sample (sample_rows), each by
    its own (seed, position)."""
    return pick(logits, params, seeds, positions, banned, seen)[0]


def with_logprobs(tokens: list[int], lps: list) -> list:
    """Tokens as a step reply carries them: an int, or [token, logprob entry] where one was asked."""
    return [t if lp is None else [t, lp] for t, lp in zip(tokens, lps)]


# ---------------------------------------------------------------------- on the wire (pipelines)
def wire_fields(params: SamplingParams, token_ids: list[int], num_prompt: int) -> dict | None:
    """What a step message carries, beyond temp/top_k/top_p/seed/banned, for the sampling worker
    to apply `params` (cluster.messages.SampleExtra): None for plain params; the tokens so far
    only when a penalty needs them."""
    if params.plain:
        return None
    x = {"pres": params.presence_penalty, "freq": params.frequency_penalty, "rep": params.repetition_penalty,
         "min_p": params.min_p, "bias": [[t, b] for t, b in params.logit_bias.items()], "lp": params.logprobs}
    if params.penalized:
        x["seen"], x["np"] = list(token_ids), num_prompt
    return x


def from_wire(temp: float, top_k: int, top_p: float, x: dict | None
              ) -> tuple[SamplingParams, tuple[list[int], int] | None]:
    """The SamplingParams (for sampling one token) and penalty history of one step-message item."""
    x = x or {}
    p = SamplingParams(max_tokens=1, temperature=temp, top_k=top_k, top_p=top_p,
                       presence_penalty=x.get("pres", 0.0), frequency_penalty=x.get("freq", 0.0),
                       repetition_penalty=x.get("rep", 1.0), min_p=x.get("min_p", 0.0),
                       logit_bias={int(t): b for t, b in x.get("bias") or []}, logprobs=x.get("lp"))
    return p, ((x["seen"], x["np"]) if x.get("seen") is not None else None)
