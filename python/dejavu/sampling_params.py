"""Sampling parameters, in the spirit of vLLM's and OpenAI's."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
MAX_N = 16
_MASK63 = (1 << 63) - 1


@dataclass
class SamplingParams:
    """How to pick each token. `temperature == 0` is greedy (the default).

    Each sampled token's randomness is drawn from (seed, position in the sequence), so the same
    request gives the same tokens whatever else is in its batch, and a resumed request continues
    exactly. Without a seed the engine picks one per request and records it.

    Logit processing, in order (vLLM's): banned tokens (min_tokens), `logit_bias` (added to the
    logits), `repetition_penalty` (HF's: over prompt and output tokens, a positive logit divided by
    it, a negative one multiplied), `frequency_penalty` / `presence_penalty` (OpenAI's: over output
    tokens, count * frequency + presence subtracted), then temperature, `min_p`, top-k and top-p.
    `logprobs`: that many top alternatives (0: only the sampled token's) per output token, of the
    raw model distribution (before any processing), as vLLM returns them; `prompt_logprobs`: the
    same for each prompt token after the first (the single-process engine computes them). `n`: choices per prompt
    (LLM.generate and the server expand it; choice i > 0 samples with choice_seed(seed, i)).
    """
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0          # 0 or -1: no top-k
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be a list of non-negative integers")
        for name, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
            v = getattr(self, name)
            if not _finite(v) or not lo <= v <= hi:
                bad(f"{name} must be in [{lo}, {hi}], got {v!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if any(not _int(t) or t < 0 or not _finite(b) or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
            bad("logit_bias must map non-negative token ids to numbers in [-100, 100]")
        if self.logprobs is not None and (not _int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not _int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            bad(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not _int(self.n) or not 1 <= self.n <= MAX_N:
            bad(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """True when sampling needs the tokens so far (a penalty is on)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain(self) -> bool:
        """True when the next token is a function of the raw logits alone: no bias, penalty or min_p,
        and no logprobs to report (the on-device greedy fast path may pick it)."""
        return not (self.penalized or self.logit_bias or self.min_p or self.logprobs is not None)

    def choices(self) -> list[SamplingParams]:
        """One SamplingParams per choice (n of them, each n=1): choice 0 keeps the seed, choice i
        gets choice_seed(seed, i), so every choice is reproducible and they differ."""
        return [replace(self, n=1, seed=self.seed if i == 0 or self.seed is None else choice_seed(self.seed, i))
                for i in range(self.n)]


def choice_seed(seed: int, i: int) -> int:
    """The seed of choice i of a request seeded `seed`: a 63-bit mix, not seed + i (which would
    make choice 1 of seed s the same as choice 0 of seed s + 1)."""
    x = (seed * 0xD6E8FEB86659FD93 + i * 0x9E3779B97F4A7C15) & _MASK63
    x ^= x >> 32
    return (x * 0xD6E8FEB86659FD93) & _MASK63


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
