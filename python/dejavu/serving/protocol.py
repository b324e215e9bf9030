"""OpenAI-compatible request parsing: JSON bodies to prompts and SamplingParams, with errors that
name the offending field (returned as HTTP 400 in OpenAI's error shape)."""
from __future__ import annotations

from dataclasses import dataclass

from ..sampling_params import SamplingParams


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _num(body, name, default, lo=None, hi=None, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(v).__name__}", name)
    if lo is not None and v < lo:
        raise BadRequest(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise BadRequest(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be a boolean", name)
    return v


UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "best_of": (None, 1),
               "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "response_format": (None,)}


@dataclass
class Parsed:
    prompts: list  # str or list[int] each
    params: list[SamplingParams]
    stream: bool
    include_usage: bool


def parse_sampling(body: dict, n_default_tokens: int = 16, chat: bool = False) -> tuple[list[SamplingParams], bool, bool]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise BadRequest(f"'{name}' is not supported by this server", name)
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    if max_tokens is None:
        max_tokens = n_default_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest("'max_tokens' must be an integer", "max_tokens")
    if max_tokens <= 0:
        raise BadRequest(f"'max_tokens' must be > 0, got {max_tokens}", "max_tokens")
    n = _num(body, "n", 1, 1, 16, integer=True)
    temperature = _num(body, "temperature", 1.0, 0, 100)
    top_p = _num(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _num(body, "top_k", 0, -1, integer=True)
    min_tokens = _num(body, "min_tokens", 0, 0, max_tokens, integer=True)
    seed = _num(body, "seed", None, 0, 2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 16:
        raise BadRequest("'stop' must be a string or a list of up to 16 non-empty strings", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    ignore_eos = _bool(body, "ignore_eos")
    stream = _bool(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    include_usage = bool(opts.get("include_usage", False))
    params = [SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                             seed=None if seed is None else seed + i, stop=stop, stop_token_ids=stop_ids,
                             ignore_eos=ignore_eos, min_tokens=min_tokens) for i in range(n)]
    if stream and n > 1:
        raise BadRequest("'stream' with 'n' > 1 is not supported", "n")
    return params, stream, include_usage


def parse_prompt(body: dict) -> list:
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [p]
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or isinstance(p[0], list)):
        return parse_prompt({"prompt": p[0]})
    if p is None:
        raise BadRequest("'prompt' is required", "prompt")
    raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest("each message needs a 'role' of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest("each message needs string 'content'", "messages")
        out.append({"role": m["role"], "content": content})
    return out
