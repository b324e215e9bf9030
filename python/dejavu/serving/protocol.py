"""OpenAI-compatible request parsing: JSON bodies to prompts and SamplingParams, with errors that
name the offending field (returned as HTTP 400 in OpenAI's error shape).

Everything a request carries is checked here, before it reaches the tokenizer or the engine:
numbers are finite and in range, strings are encodable Unicode (JSON's "\\ud800" decodes to a lone
surrogate that no tokenizer accepts), token ids are inside the model's vocabulary, and a prompt
that cannot fit the context is refused before it is tokenized (PromptBounds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams

MAX_STOP_TOKEN_IDS = 256
MAX_PROMPTS = 256  # prompts in one completions request (a batching client's list)


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class PromptBounds:
    """What a prompt may be for this model: token ids below `vocab_size`, at most `max_model_len`
    tokens, and (when the tokenizer lets us bound it) at most `max_chars` characters of text."""
    vocab_size: int
    max_model_len: int
    max_chars: int | None = None


def max_prompt_chars(tokenizer, max_model_len: int) -> int | None:
    """Characters beyond which a text is certainly longer than `max_model_len` tokens: each token
    covers at most `tokenizer.max_token_chars` characters. None when the tokenizer gives no bound."""
    per_token = getattr(tokenizer, "max_token_chars", None)
    return max_model_len * per_token if per_token else None


def _num(body, name, default, lo=None, hi=None, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(v).__name__}", name)
    if isinstance(v, float) and not math.isfinite(v):
        raise BadRequest(f"'{name}' must be a finite number, got {v}", name)
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


def check_text(s: str, name: str) -> str:
    """`s` unchanged if it is encodable Unicode; a lone surrogate is a 400 naming the field."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'{name}' is not valid Unicode: a lone surrogate {s[e.start]!r} at character {e.start}",
                         name) from None
    return s


def _token_ids(ids: list, name: str, vocab_size: int | None) -> list[int]:
    if vocab_size is not None and any(t < 0 or t >= vocab_size for t in ids):
        raise BadRequest(f"'{name}' token ids must be in [0, {vocab_size})", name)
    return ids


# Fields refused unless they carry one of these values (a clear 400 naming the field, never ignored).
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"})}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions cap
# Every field a request may carry; any other is ignored (as vLLM does) and logged once by the server.
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
                   "stop_token_ids", "seed", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "min_p", "min_tokens", "logit_bias", "ignore_eos", "user", *UNSUPPORTED}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls"}


@dataclass
class Request:
    """What a completion or chat body asks for besides its prompt. `params` has one entry per
    choice (n of them). logprobs: None, or top alternatives per token (0: the sampled token's only);
    with `echo` the prompt's tokens get them too. echo_only: max_tokens 0 with echo, the prompt
    alone (the engine still samples one token, which the response leaves out, as vLLM does)."""
    params: list[SamplingParams]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    echo_only: bool = False
    ignored: list[str] = field(default_factory=list)  # fields this server does not know, in request order


def _logit_bias(body: dict, vocab_size: int | None) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise BadRequest("'logit_bias' must be an object of at most 1024 token ids to numbers", "logit_bias")
    out = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except ValueError:
            raise BadRequest(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise BadRequest(f"'logit_bias' values must be numbers in [-100, 100], got {v!r}", "logit_bias")
        out[t] = float(v)
    _token_ids(list(out), "logit_bias", vocab_size)
    if any(t < 0 for t in out):
        raise BadRequest("'logit_bias' token ids must be non-negative", "logit_bias")
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        on = _bool(body, "logprobs")
        k = _num(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if k is not None and not on:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (k or 0) if on else None
    if isinstance(body.get("logprobs"), bool):
        raise BadRequest("'logprobs' of a completion is an integer (how many alternatives per token)", "logprobs")
    return _num(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS, integer=True)


def parse_sampling(body: dict, n_default_tokens: int = 16, chat: bool = False,
                   vocab_size: int | None = None) -> Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            what = "only {'type': 'text'} is supported" if name == "response_format" else "not supported"
            raise BadRequest(f"'{name}' is {what} by this server", name)
    if chat:
        _check_tools(body)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = n_default_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest(f"'{name}' must be an integer", name)
    echo = False if chat else _bool(body, "echo")
    echo_only = echo and max_tokens == 0
    if max_tokens <= 0 and not echo_only:
        raise BadRequest(f"'{name}' must be > 0 (0 only with 'echo'), got {max_tokens}", name)
    max_tokens = max(max_tokens, 1)
    n = _num(body, "n", 1, 1, MAX_N, integer=True)
    temperature = _num(body, "temperature", 1.0, 0, 100)
    top_p = _num(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _num(body, "top_k", 0, -1, 2**31 - 1, integer=True)
    min_tokens = _num(body, "min_tokens", 0, 0, max_tokens, integer=True)
    seed = _num(body, "seed", None, 0, 2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 16:
        raise BadRequest("'stop' must be a string or a list of up to 16 non-empty strings", "stop")
    for x in stop:
        check_text(x, "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                  for x in stop_ids) or len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise BadRequest(f"'stop_token_ids' must be a list of up to {MAX_STOP_TOKEN_IDS} non-negative integers",
                         "stop_token_ids")
    _token_ids(stop_ids, "stop_token_ids", vocab_size)
    ignore_eos = _bool(body, "ignore_eos")
    stream = _bool(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    include_usage = _bool(opts, "include_usage")
    pen = {k: float(_num(body, k, 0.0, -2, 2)) for k in ("presence_penalty", "frequency_penalty")}
    repetition = float(_num(body, "repetition_penalty", 1.0))
    if repetition <= 0:
        raise BadRequest(f"'repetition_penalty' must be > 0, got {repetition}", "repetition_penalty")
    min_p = float(_num(body, "min_p", 0.0, 0, 1))
    logprobs = _logprobs(body, chat)
    sp = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                        seed=seed, stop=stop, stop_token_ids=stop_ids, ignore_eos=ignore_eos, min_tokens=min_tokens,
                        repetition_penalty=repetition, min_p=min_p, logit_bias=_logit_bias(body, vocab_size),
                        logprobs=logprobs, prompt_logprobs=logprobs if echo else None, n=n, **pen)
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    return Request(sp.choices(), stream, include_usage, logprobs, echo, echo_only, [k for k in body if k not in known])


def _check_tools(body: dict) -> None:
    """Tool calling is not implemented: `tools` and `tool_choice` are refused, naming the field,
    unless tool_choice is "none" (the model then answers in text and the tools are not shown to it)."""
    choice = body.get("tool_choice")
    if choice == "none":
        return
    if body.get("tools"):
        raise BadRequest("'tools' is not supported by this server (no tool calls are parsed); leave it out or "
                         "send tool_choice 'none'", "tools")
    if choice is not None:
        raise BadRequest(f"'tool_choice' {choice!r} is not supported by this server (no tools); only 'none' is",
                         "tool_choice")


def _too_long(what: str, n: int, unit: str, limit: int, bounds: PromptBounds) -> BadRequest:
    return BadRequest(f"{what} of {n} {unit} is longer than any prompt the model's context of "
                      f"{bounds.max_model_len} tokens can hold (at most {limit} {unit})", what.split()[0])


def parse_prompts(body: dict, bounds: PromptBounds | None = None) -> list[str | list[int]]:
    """A completion request's prompts, as OpenAI takes them: a text, a list of token ids, or a
    list of up to MAX_PROMPTS of either (each its own choices); token ids checked against `bounds`."""
    p = body.get("prompt")
    if p is None:
        raise BadRequest("'prompt' is required", "prompt")
    many = isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p)
    prompts = p if many else [p]
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"'prompt' holds {len(prompts)} prompts, more than {MAX_PROMPTS} in one request", "prompt")
    return [_one_prompt(x, bounds) for x in prompts]


def _one_prompt(p, bounds: PromptBounds | None) -> str | list[int]:
    if isinstance(p, str):
        if bounds is not None and bounds.max_chars is not None and len(p) > bounds.max_chars:
            raise _too_long("prompt text", len(p), "characters", bounds.max_chars, bounds)
        return check_text(p, "prompt")
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if bounds is not None:
            if len(p) > bounds.max_model_len:
                raise _too_long("prompt", len(p), "tokens", bounds.max_model_len, bounds)
            _token_ids(p, "prompt", bounds.vocab_size)
        return p
    raise BadRequest("'prompt' must be a string, a list of token ids, or a list of either", "prompt")


# Chat roles, as the chat template sees them: OpenAI's "developer" is the system prompt of newer models.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(body: dict, bounds: PromptBounds | None = None) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out, chars = [], 0
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest("each message needs a 'role' of developer, system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest("each message needs string 'content'", "messages")
        chars += len(content)
        if bounds is not None and bounds.max_chars is not None and chars > bounds.max_chars:
            raise _too_long("messages text", chars, "characters", bounds.max_chars, bounds)
        out.append({"role": ROLES[m["role"]], "content": check_text(content, "messages")})
    return out
