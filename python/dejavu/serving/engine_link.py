"""The channel between the HTTP front-end and the controller process (serving/frontend.py,
serving/engine_core.py): typed records like the worker protocol's (cluster/records.py), in the same
frames, opened by the same token-checked HELLO (parallel/auth.py Acceptor). Nothing is unpickled.

The front-end keeps the log of admitted requests (prompt, sampling parameters, seed, tokens already
streamed); a `submit` carries all of it, so a controller started after another one died resumes each
request from its last streamed token.
"""
from __future__ import annotations

import dataclasses

from ..cluster.messages import Message, TokenLogprobs, message, record
from ..sampling_params import SamplingParams

FRONTEND, ENGINE = "front-end -> controller", "controller -> front-end"


@record
class WireParams:
    """SamplingParams' fields (n is always 1: the front-end expands choices)."""
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    min_tokens: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_p: float
    logit_bias: list[list[float]]  # [token id, bias] pairs
    logprobs: int | None
    prompt_logprobs: int | None


def params_to_wire(p: SamplingParams) -> WireParams:
    d = {f.name: getattr(p, f.name) for f in dataclasses.fields(WireParams)}
    d["logit_bias"] = [[int(t), float(b)] for t, b in p.logit_bias.items()]
    for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        d[k] = float(d[k])
    return WireParams(**d)


def params_from_wire(w: WireParams) -> SamplingParams:
    """The SamplingParams of a `submit` (validated: ValueError names a bad field)."""
    d = {f.name: getattr(w, f.name) for f in dataclasses.fields(WireParams)}
    bias = {}
    for pair in w.logit_bias:
        if len(pair) != 2 or pair[0] != int(pair[0]):
            raise ValueError(f"logit_bias entries must be [token id, bias] pairs, got {pair!r:.60}")
        bias[int(pair[0])] = float(pair[1])
    d["logit_bias"] = bias
    return SamplingParams(**d)


# ---------------------------------------------------------------------- front-end -> controller
@message("engine_args", FRONTEND)
class EngineArgs(Message):
    """The deployment to build (`dejavu serve`'s flags; no API key), sent once after the HELLO."""
    args: dict
    adopt: bool = False          # take over the live workers of the controller that died (cluster/adopt.py)
    pids: list[list[int]] | None = None  # [rank, pid] of each worker to adopt on this host (gone: fail at once)


@message("submit", FRONTEND)
class Submit(Message):
    rid: int                     # the front-end's request id
    prompt: list[int]
    text: str | None             # the prompt's text, when it came as text
    params: WireParams
    seed: int                    # fixed by the front-end: a resumed request samples as before
    emitted: list[int]           # output tokens already streamed (a resumed request)


@message("cancel", FRONTEND)
class Cancel(Message):
    rid: int


@message("stop", FRONTEND)
class Stop(Message):
    """The deployment is stopping: no worker exit from now on is a failure (Controller.begin_stop)."""


# ---------------------------------------------------------------------- controller -> front-end
@message("engine_started", ENGINE)
class EngineStarted(Message):
    pid: int
    num_blocks: int              # KV blocks one request may use (the front-end checks requests with it)


@message("update", ENGINE)
class Update(Message):
    rid: int
    tokens: list[int]            # new output tokens
    logprobs: list[TokenLogprobs | None] | None = None
    finish: str | None = None    # the finish reason, once finished
    text: str | None = None      # the output text, once finished
    error: str | None = None     # the request failed (or was refused: status 400)
    status: int = 500


@message("stopping", ENGINE)
class Stopping(Message):
    """A stop signal reached the controller: it is stopping the deployment (not a failure to recover)."""


@message("status", ENGINE)
class Status(Message):
    """Pushed every STATUS_INTERVAL seconds: what /v1/cluster and /metrics show of the engine."""
    pid: int
    workers: list[dict]
    recovering: list[int]
    fault_tolerance: dict
    waiting: int
    blocks_used: int
    blocks_total: int
    prefix_cache: dict | None = None
    prefix_tiers: dict | None = None


STATUS_INTERVAL = 0.25
