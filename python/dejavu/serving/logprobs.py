"""Logprobs in OpenAI's two response shapes, from the engine's per-token entries.

An entry (engine/sampler.py pick) is [logprob of the sampled token, [[id, logprob], ...top k]],
of the raw model distribution (before penalties, bias and temperature), as vLLM returns by
default. Token strings are each token decoded alone; a token that is part of a UTF-8 character
decodes to "\ufffd", and `bytes` (chat) then still tells what it is only where the tokenizer maps
it to whole characters.
"""
from __future__ import annotations


def _token_text(tok, cache: dict, t: int) -> str:
    s = cache.get(t)
    if s is None:
        s = cache[t] = tok.decode([t])
    return s


def completion_logprobs(tok, ids: list[int], entries: list, offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset. An entry
    may be None (the first prompt token of an echo): its logprob and alternatives are null."""
    cache: dict = {}
    texts = [_token_text(tok, cache, t) for t in ids]
    offsets = []
    for s in texts:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": texts, "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {_token_text(tok, cache, t): lp for t, lp in e[1]}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(tok, ids: list[int], entries: list) -> dict:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    cache: dict = {}

    def one(t, lp):
        s = _token_text(tok, cache, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**one(t, e[0]), "top_logprobs": [one(a, lp) for a, lp in e[1]]} for t, e in zip(ids, entries)]}
