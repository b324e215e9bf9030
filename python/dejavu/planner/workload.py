"""What `dejavu simulate` simulates: a deployment (ft:D or disagg:Dp+Dt), the simulator's options,
and the requests (lengths, with Poisson or trace arrivals)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .model import PlanError


@dataclass
class Req:
    rid: int
    arrival: float
    prompt: int
    output: int
    generated: int = 0
    first_token: float | None = None
    finish: float | None = None
    restarts: int = 0
    recomputed: int = 0


@dataclass
class Deployment:
    mode: str                 # "ft" or "disagg"
    stages: int = 1           # ft: D
    prompt_stages: int = 0    # disagg
    token_stages: int = 0

    @property
    def machines(self) -> int:
        return self.stages if self.mode == "ft" else self.prompt_stages + self.token_stages

    @classmethod
    def parse(cls, text: str) -> "Deployment":
        """ft:D or disagg:Dp+Dt"""
        kind, _, rest = text.partition(":")
        try:
            if kind == "ft":
                d = cls("ft", stages=int(rest))
                ok = d.stages >= 1
            elif kind == "disagg":
                a, _, b = rest.partition("+")
                d = cls("disagg", prompt_stages=int(a), token_stages=int(b))
                ok = d.prompt_stages >= 1 and d.token_stages >= 1
            else:
                ok = False
        except ValueError:
            ok = False
        if not ok:
            raise PlanError(f"deployment {text!r}: use ft:D (D >= 1) or disagg:Dp+Dt (each >= 1)")
        return d

    def __str__(self) -> str:
        return f"ft:{self.stages}" if self.mode == "ft" else f"disagg:{self.prompt_stages}+{self.token_stages}"


@dataclass
class SimOptions:
    microbatch: int = 8
    max_batched_tokens: int = 8192
    receive_slots: int = 8
    m: float = 1.0
    swap: bool = False
    fail_at: float | None = None
    fail_stage: tuple[str, int] = ("token", 0)   # role ("stage" in ft, "prompt"/"token"), index
    replicate: bool = True
    detect_s: float = 2.0
    restart_s: float = 5.0
    gpu_hour_cost: float = 0.0
    trace_events: bool = False


def workload(lengths: list[tuple[int, int]], rate: float, seed: int = 0) -> list[Req]:
    """Requests with Poisson arrivals at `rate` per second (inf: all at time 0)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i, (p, o) in enumerate(lengths):
        if p <= 0 or o <= 0:
            raise PlanError(f"request {i}: prompt and output lengths must be > 0, got {p} and {o}")
        out.append(Req(i, t, p, o))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return out
