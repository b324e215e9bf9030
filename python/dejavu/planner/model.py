"""The planner's closed-form model (DéjàVu, section 4.2.1 and Appendix D) and the profile it reads.

Notation (per microbatch of b requests, prompt P tokens, N new tokens, D machines in all):
  Y  time of one pipeline stage to prefill the microbatch, at depth D (each stage 1/D of the layers)
  t  time of one stage for one decode step of the microbatch, at depth D
  m  prompt-side cost factor of disaggregation (>= 1): a disaggregated prompt stage holding D/Dp
     times the layers takes m * (D/Dp) * Y; m > 1 covers what the split adds (KV streaming not
     hidden behind compute, a changed microbatch). 1 = ideal.
Inverse throughput (seconds per microbatch in steady state):
  FT pipeline      Y + N t + (D-1)(Y-t)/D     (prompt steps of one microbatch stall the others)
  disaggregated    max(D m Y / Dp, D N t / Dt) with Dp + Dt = D
Balanced split Dp = D mY / (mY + Nt); disaggregation wins iff Y/t > (D-1) / (D(2-m) - 1) (never
when D(2-m) <= 1).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field


class PlanError(ValueError):
    """Inputs the planner or simulator cannot use; the message names the problem."""


@dataclass
class Fit:
    """time(b, x) = a + c * b + d * b * x: x is the prompt length (prompt) or the context (token)."""
    a: float
    c: float
    d: float
    e: float = 0.0  # prompt only: + e * b * x^2 (attention)

    def __call__(self, b: float, x: float) -> float:
        return max(0.0, self.a + self.c * b + self.d * b * x + self.e * b * x * x)


@dataclass
class Profile:
    """What `dejavu profile` measures: stage times as a function of the layers a stage holds and of
    whether it is the first (embeddings) or last (final norm, LM head, sampling) stage, memory per
    layer, and the bandwidths the streaming features use. Four measured stages per kind of step:
    one middle layer (`*_one`), the first layer (`*_first`), the last layer (`*_last`) and all
    layers (`*_all`); all are linear in the same features, so per-layer, embedding and head costs
    follow by subtraction."""
    model: str
    device: str
    num_layers: int
    weight_bytes: int                 # all layers plus embeddings and head
    kv_bytes_per_token: int           # K and V of one token, all layers
    prompt_one: Fit
    prompt_all: Fit
    token_one: Fit
    token_all: Fit
    prompt_first: Fit | None = None   # None: same as *_one (no separate embedding / head cost)
    prompt_last: Fit | None = None
    token_first: Fit | None = None
    token_last: Fit | None = None
    pcie_bytes_per_s: float = 0.0     # device <-> pinned host (swapping, replication)
    kv_link_bytes_per_s: float = 0.0  # prompt -> token worker (disaggregation)
    stage_link_bytes_per_s: float = 0.0  # hidden states stage -> next stage (FT pipes: device -> host -> TCP -> device); 0: free
    hidden_bytes_per_token: int = 0      # one token's hidden state as it crosses a stage boundary
    step_overhead_s: float = 0.0      # controller round trip per pipeline step
    admit_blocks_stage: bool = True   # the token worker copies arriving KV in itself (CPU, TCP)
    card: str = ""
    dtype: str = ""
    memory_bytes: int = 0             # per device, 0 = not known
    samples: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- stage times
    def stage_time(self, kind: str, layers: int, first: bool, last: bool, n: int, s1: float, s2: float = 0.0) -> float:
        """One stage of `layers` layers running a step of n sequences whose lengths (prompt: new
        tokens; decode: context) sum to s1 (squares to s2)."""
        one, full = (self.prompt_one, self.prompt_all) if kind == "prefill" else (self.token_one, self.token_all)
        fst = (self.prompt_first if kind == "prefill" else self.token_first) or one
        lst = (self.prompt_last if kind == "prefill" else self.token_last) or one

        def ev(f: Fit) -> float:
            return f.a + f.c * n + f.d * s1 + f.e * s2

        t1, tf, tl, ta = ev(one), ev(fst), ev(lst), ev(full)
        embed, head = tf - t1, tl - t1
        L = self.num_layers
        per_layer = (ta - embed - head - t1) / (L - 1) if L > 1 else 0.0
        t = t1 + (layers - 1) * per_layer + (embed if first else 0.0) + (head if last else 0.0)
        return max(0.0, t)

    def prompt_time(self, depth: int, b: float, prompt: float) -> float:
        """Y: the slowest stage of a `depth`-stage pipeline prefilling b prompts of `prompt` tokens."""
        return max(self.stage_time("prefill", k, i == 0, i == depth - 1, b, b * prompt, b * prompt * prompt)
                   for i, k in enumerate(stage_layers(self.num_layers, depth)))

    def token_time(self, depth: int, b: float, context: float) -> float:
        """t: the slowest stage of a `depth`-stage pipeline decoding one token for b sequences."""
        return max(self.stage_time("decode", k, i == 0, i == depth - 1, b, b * context)
                   for i, k in enumerate(stage_layers(self.num_layers, depth)))

    # ---------------------------------------------------------------- I/O
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        try:
            d = dict(d)
            for k in ("prompt_one", "prompt_all", "token_one", "token_all", "prompt_first", "prompt_last",
                      "token_first", "token_last"):
                if d.get(k) is not None:
                    d[k] = Fit(**d[k])
            p = cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})
        except (TypeError, KeyError) as e:
            raise PlanError(f"not a DéjàVu profile: {e}") from None
        if p.num_layers <= 0 or p.weight_bytes <= 0 or p.kv_bytes_per_token <= 0:
            raise PlanError("profile: num_layers, weight_bytes and kv_bytes_per_token must be > 0")
        return p

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except OSError as e:
            raise PlanError(f"cannot read profile {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"profile {path} is not JSON: {e}") from None


def stage_layers(num_layers: int, depth: int) -> list[int]:
    """Layers per stage, as the engines assign them (routing.split_layers)."""
    from ..kvstream.routing import split_layers

    if depth > num_layers:
        raise PlanError(f"{depth} stages for {num_layers} layers: a stage would be empty")
    return [b - a for a, b in split_layers(num_layers, depth)]


# -------------------------------------------------------------------- closed forms
def ft_inverse_throughput(Y: float, t: float, N: int, D: int) -> float:
    """Seconds per microbatch of the FT pipeline of depth D in steady state."""
    return Y + N * t + (D - 1) * (Y - t) / D


def disagg_inverse_throughput(Y: float, t: float, N: int, D: int, Dp: int, Dt: int, m: float = 1.0) -> float:
    """Seconds per microbatch of a disaggregated deployment (Dp prompt + Dt token machines); Y and t
    are stage times at depth D."""
    if Dp <= 0 or Dt <= 0:
        raise PlanError(f"a disaggregated deployment needs Dp, Dt >= 1, got {Dp} and {Dt}")
    return max(D * m * Y / Dp, D * N * t / Dt)


def balanced_split(Y: float, t: float, N: int, D: int, m: float = 1.0) -> float:
    """The real-valued Dp that balances the two pipelines (D - Dp token machines)."""
    return D * m * Y / (m * Y + N * t)


def disagg_threshold(D: int, m: float = 1.0) -> float:
    """Disaggregation beats the FT pipeline iff Y/t exceeds this (inf: never)."""
    den = D * (2 - m) - 1
    return math.inf if den <= 0 else (D - 1) / den


def min_depth(weight_bytes: int, kv_bytes_per_token: int, b: int, tokens: int, memory: int) -> int:
    """Fewest stages such that one stage holds its share of the weights plus its share of the KV
    of the D microbatches in flight (D * b * tokens tokens over D stages = b * tokens per stage)."""
    if memory <= 0:
        return 1
    free = memory - b * tokens * kv_bytes_per_token
    if free <= 0:
        raise PlanError(f"a microbatch of {b} x {tokens} tokens needs {b * tokens * kv_bytes_per_token / 2**30:.2f} GiB "
                        f"of KV per stage, more than the {memory / 2**30:.2f} GiB a device has; lower the microbatch")
    return max(1, math.ceil(weight_bytes / free))


def fits_with_swapping(weight_bytes: int, kv_bytes_per_token: int, b: int, tokens: int, memory: int, depth: int,
                       resident: int = 2) -> bool:
    """With swapping only `resident` of the `depth` microbatches' KV is on the device at once."""
    k = min(resident, depth)
    return weight_bytes / depth + k * b * tokens * kv_bytes_per_token / depth <= memory
