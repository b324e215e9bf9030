"""POST /v1/completions and /v1/chat/completions: a request's prompts and choices submitted to the
engine, answered whole or as server-sent events. A mixin of ApiServer (serving/api.py), which owns
the engine, the tokenizer pool, the body reader and the set of running requests."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from aiohttp import web

from ..engine.llm_engine import RequestError
from .async_engine import QueueFull, RequestFailed, Stream
from .choices import chat_choice, completion_choice, echo_part, usage
from .detok import TextStream
from .http_errors import SHUTTING_DOWN, HttpError, bad_request, error
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import BadRequest, Request, parse_messages, parse_prompts, parse_sampling

log = logging.getLogger("dejavu.server")
MAX_LOGGED_FIELDS = 256


class OpenAIRoutes:
    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat(self, request):
        return await self._generate(request, chat=True)

    def _template(self, messages: list[dict]) -> list[int]:
        try:
            return list(self.llm.tokenizer.apply_chat_template(messages))
        except Exception as e:  # noqa: BLE001 - the template itself failed on these messages
            raise BadRequest(f"cannot apply the chat template: {e}", "messages") from None

    def _encode(self, text: str) -> list[int]:
        try:
            return list(self.llm.tokenizer.encode(text))
        except Exception as e:  # noqa: BLE001 - the tokenizer refused this text
            raise BadRequest(f"cannot tokenize the prompt: {e}", "prompt") from None

    async def _prompt_ids(self, body: dict, chat: bool) -> list[list[int]]:
        """The request's prompts as token ids (one for chat), every field checked; tokenized on the pool."""
        if chat:
            prompts, what = [await self._offload(self._template, parse_messages(body, self.bounds))], "messages"
        else:
            prompts, what = parse_prompts(body, self.bounds), "prompt"
            prompts = [await self._offload(self._encode, p) if isinstance(p, str) else p for p in prompts]
        for ids in prompts:
            if len(ids) > self.bounds.max_model_len:
                raise BadRequest(f"the prompt is {len(ids)} tokens, more than the model's context length of "
                                 f"{self.bounds.max_model_len} tokens", what)
        return prompts

    def _note_ignored(self, names: list[str]) -> None:
        """Fields this server does not know are ignored, as vLLM does; each is logged once (the first
        MAX_LOGGED_FIELDS names, so random keys cannot grow the set or flood the log)."""
        new = [n[:64] for n in names if n[:64] not in self._ignored_fields]
        new = new[:max(0, MAX_LOGGED_FIELDS - len(self._ignored_fields))]
        if new:
            self._ignored_fields.update(new)
            log.warning("ignoring request field(s) this server does not know: %s", ", ".join(map(repr, new)))

    async def _generate(self, request, chat: bool):
        streams: list[Stream] = []
        try:
            body = await self._body(request)
            req = parse_sampling(body, chat=chat, vocab_size=self.bounds.vocab_size)
            self._note_ignored(req.ignored)
            if req.echo and req.logprobs is not None and not self.llm.engine.computes_prompt_logprobs:
                raise BadRequest("'echo' with 'logprobs' (prompt logprobs) is not available in this deployment: "
                                 "only the single-process engine computes every prompt position's logits", "echo")
            # Choices in OpenAI's order: prompt i's n choices have indices i*n .. i*n + n-1.
            for prompt in await self._prompt_ids(body, chat):
                for p in req.params:
                    if self._closing:
                        raise HttpError(SHUTTING_DOWN, 503)
                    streams.append(await self.engine.submit(prompt, p))
                    self._active.add(streams[-1])
        except BadRequest as e:
            return self._refuse(streams, bad_request(e))
        except (RequestError, ValueError) as e:
            return self._refuse(streams, error(400, str(e)))
        except HttpError as e:
            return self._refuse(streams, error(e.status, str(e)))
        except QueueFull as e:
            return self._refuse(streams, error(429, str(e), "rate_limit_error"))
        except RequestFailed as e:
            self.metrics.inc("dejavu_requests_failed_total")
            return self._refuse(streams, error(500, f"the request failed: {e}", "server_error"))
        except RuntimeError as e:
            return self._refuse(streams, error(503, str(e), "server_error"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            if req.stream:
                return await self._stream(request, rid, streams, chat, req)
            return await self._complete(rid, streams, chat, req)
        finally:
            for s in streams:
                self._active.discard(s)
                if s.seq is None or not s.seq.finished:
                    self.engine.abort(s)

    def _refuse(self, streams: list[Stream], response: web.Response) -> web.Response:
        for s in streams:
            self._active.discard(s)
            self.engine.abort(s)
        return response

    async def _wait(self, s: Stream):
        while True:
            kind, *rest = await s.updates.get()
            if kind == "error":
                raise HttpError(rest[0], rest[1])
            if rest[1]:
                return

    def _envelope(self, rid: str, obj: str, created: int) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                "system_fingerprint": self.fingerprint}

    async def _complete(self, rid, streams, chat, req: Request):
        try:
            for s in streams:
                await self._wait(s)
        except HttpError as e:
            if e.status >= 500 and str(e) != SHUTTING_DOWN:
                self.metrics.inc("dejavu_requests_failed_total")
            return error(e.status, str(e) if str(e) == SHUTTING_DOWN else f"generation failed: {e}", "server_error")
        tok, build = self.llm.tokenizer, chat_choice if chat else completion_choice
        choices = [build(tok, s.seq, i, req) for i, s in enumerate(streams)]
        out = self._envelope(rid, "chat.completion" if chat else "text_completion", int(time.time()))
        return web.json_response({**out, "choices": choices, "usage": usage(streams, req)})

    async def _stream(self, request, rid, streams: list[Stream], chat, req: Request):
        """Server-sent events; with n > 1 the choices' chunks interleave, each with its index."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        head = self._envelope(rid, "chat.completion.chunk" if chat else "text_completion", int(time.time()))
        tok = self.llm.tokenizer

        async def send(choice, usage=None):
            chunk = {**head, "choices": choice}
            if usage is not None:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        merged: asyncio.Queue = asyncio.Queue()

        async def forward(i, s):
            while True:
                update = await s.updates.get()
                await merged.put((i, update))
                if update[0] == "error" or update[2]:
                    return
        tasks = [asyncio.create_task(forward(i, s)) for i, s in enumerate(streams)]
        texts = [TextStream(tok, s.seq.params.stop) for s in streams]
        got = [0] * len(streams)  # tokens of each choice sent so far
        echo = set(range(len(streams))) if req.echo else set()  # choices whose prompt is still to echo
        for i, s in enumerate(streams):
            if chat:
                await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            live = len(streams)
            while live:
                i, (kind, *rest) = await merged.get()
                if kind == "error":
                    if rest[0] != SHUTTING_DOWN:
                        self.metrics.inc("dejavu_requests_failed_total")
                    err = {"message": rest[0], "type": "server_error", "code": rest[1]}
                    await resp.write(f"data: {json.dumps({'error': err})}\n\n".encode())
                    break
                new, finished = rest
                seq = streams[i].seq
                if i in echo:  # after its prefill, which computed the prompt's logprobs
                    echo.discard(i)
                    text, lp = echo_part(tok, seq, req)
                    await send([{"index": i, "text": text, "finish_reason": None, "logprobs": lp, "token_ids": []}])
                d = texts[i].delta(new, seq.text if finished else None)
                reason = seq.finish_reason if finished else None
                if req.echo_only:  # the prompt alone: the one sampled token is not shown
                    new, d, reason = [], "", "length" if finished else None
                # One chunk per engine update, even when the text did not change yet (a token that ends
                # in an incomplete character, or a special token): clients see every token's timing.
                if new or finished:
                    lps = seq.logprobs[got[i]:got[i] + len(new)]  # appended before their tokens
                    got[i] += len(new)
                    if chat:
                        lp = chat_logprobs(tok, new, lps) if req.logprobs is not None else None
                        await send([{"index": i, "delta": {"content": d}, "finish_reason": reason, "logprobs": lp}])
                    else:
                        lp = completion_logprobs(tok, new, lps) if req.logprobs is not None else None
                        await send([{"index": i, "text": d, "finish_reason": reason, "logprobs": lp,
                                     "token_ids": new}])
                live -= finished
            else:
                if req.include_usage:
                    await send([], usage(streams, req))
        finally:
            for t in tasks:
                t.cancel()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
