"""The choices of a completion or chat response, from finished (or streaming) sequences: text,
echo of the prompt, logprobs of the prompt (echo) and of the output, in OpenAI's shapes."""
from __future__ import annotations

from .logprobs import chat_logprobs, completion_logprobs
from .protocol import Request


def echo_text(tok, seq) -> str:
    return seq.prompt if seq.prompt is not None else tok.decode(seq.token_ids[:seq.num_prompt_tokens])


def echo_part(tok, seq, req: Request) -> tuple[str, dict | None]:
    """The echoed prompt's text and (with logprobs) its logprobs: null for the first token."""
    text = echo_text(tok, seq)
    if req.logprobs is None:
        return text, None
    return text, completion_logprobs(tok, seq.token_ids[:seq.num_prompt_tokens], seq.prompt_logprobs)


def output_ids(seq, req: Request) -> list[int]:
    """The output tokens a response shows: none for an echo of the prompt alone (max_tokens 0)."""
    return [] if req.echo_only else seq.output_ids


def completion_choice(tok, seq, index: int, req: Request) -> dict:
    ids = output_ids(seq, req)
    text = "" if req.echo_only else seq.text
    lp = None
    if req.logprobs is not None:
        head = echo_text(tok, seq) if req.echo else ""
        lp = completion_logprobs(tok, ids, seq.logprobs[:len(ids)], offset=len(head))
    if req.echo:
        head, head_lp = echo_part(tok, seq, req)
        text = head + text
        if lp is not None:
            lp = {k: head_lp[k] + lp[k] for k in lp}
    return {"index": index, "text": text, "finish_reason": "length" if req.echo_only else seq.finish_reason,
            "logprobs": lp, "token_ids": ids}


def chat_choice(tok, seq, index: int, req: Request) -> dict:
    lp = chat_logprobs(tok, seq.output_ids, seq.logprobs) if req.logprobs is not None else None
    return {"index": index, "message": {"role": "assistant", "content": seq.text},
            "finish_reason": seq.finish_reason, "logprobs": lp}


def usage(streams: list, req: Request) -> dict:
    """Token counts of a request's streams (prompt-major, len(req.params) choices per prompt)."""
    n_in = sum(s.seq.num_prompt_tokens for s in streams[::len(req.params)])
    n_out = 0 if req.echo_only else sum(s.seq.num_output_tokens for s in streams)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
