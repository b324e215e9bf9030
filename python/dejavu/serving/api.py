"""`dejavu serve`: the OpenAI-compatible HTTP API over an AsyncEngine (aiohttp).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET /v1/models, /health, /metrics (Prometheus), /v1/cluster. Errors use
OpenAI's shape {"error": {"message", "type", "param", "code"}}. A client that disconnects cancels
its request and frees its KV blocks.

The event loop only moves bytes: JSON decoding, tokenization and the chat template run on a small
thread pool (never on the loop, nor on the engine thread), so a huge prompt delays only itself.
Connection, timeout and size limits: serving/http_limits.py. Shutdown (SIGINT/SIGTERM, stop())
ends every running request with an error at once instead of waiting for it to finish.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ..engine.llm_engine import RequestError
from .async_engine import AsyncEngine, QueueFull, RequestFailed, Stream
from .http_limits import CappedSite, HttpLimits
from .detok import TextStream
from .choices import chat_choice, completion_choice, echo_part, usage
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import BadRequest, PromptBounds, Request, max_prompt_chars, parse_messages, parse_prompts, parse_sampling
from .tokenize_routes import add_routes, model_card

SHUTTING_DOWN = "the server is shutting down"

log = logging.getLogger("dejavu.server")


def error(status: int, message: str, etype: str = "invalid_request_error", param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": etype, "param": param, "code": status}},
                             status=status)


class HttpError(RuntimeError):
    """A request that ends with this HTTP status (a body too slow or too large, a failed stream)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ApiServer:
    def __init__(self, llm, model_name: str, api_key: str | None = None, max_queue: int = 256,
                 limits: HttpLimits | None = None):
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.limits = limits or HttpLimits()
        self.engine = AsyncEngine(llm.engine, max_queue=max_queue)
        self.metrics = self.engine.metrics
        self.metrics.model_name = model_name
        self.metrics.counters["dejavu_http_connections_refused_total"] = 0
        self.metrics.gauges["dejavu_http_connections"] = lambda: self._site.open if self._site else 0
        eng = llm.engine
        self.bounds = PromptBounds(eng.model_config.vocab_size, eng.max_model_len,
                                   max_prompt_chars(llm.tokenizer, eng.max_model_len))
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="dejavu-tokenize")
        self._active: set[Stream] = set()  # requests in the engine, for shutdown to end
        self._closing = False
        self.created = int(time.time())
        app = web.Application(middlewares=[self._auth], client_max_size=self.limits.max_body_bytes)
        app.on_shutdown.append(self._cancel_all)
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat),
                        web.get("/v1/models", self.models), web.get("/health", self.health),
                        web.get("/metrics", self.metrics_text), web.get("/v1/cluster", self.cluster)])
        add_routes(self, app)
        self.app = app
        self._runner: web.AppRunner | None = None
        self._site: CappedSite | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ middleware and small routes
    @web.middleware
    async def _auth(self, request, handler):
        if self.api_key and request.path.startswith(("/v1/", "/tokenize", "/detokenize")):
            # Compared as bytes: a header with non-ASCII characters is just a wrong key.
            try:
                got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                got = b""
            if not hmac.compare_digest(got, f"Bearer {self.api_key}".encode()):
                return error(401, "missing or invalid API key", "authentication_error")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return error(e.status, e.reason or "error")
            raise

    async def models(self, request):
        return web.json_response({"object": "list", "data": [model_card(self)]})

    def not_found_model(self, name) -> web.Response:
        return error(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                     "NotFoundError", "model")

    async def guarded(self, fn):
        """fn()'s response, or the error response for a bad request or a failed body read."""
        try:
            return await fn()
        except BadRequest as e:
            return error(e.status, str(e), "NotFoundError" if e.status == 404 else "invalid_request_error", e.param)
        except HttpError as e:
            return error(e.status, str(e))

    async def health(self, request):
        if self.engine.error:
            return error(503, f"engine stopped: {self.engine.error}", "server_error")
        return web.json_response({"status": "ok"})

    async def metrics_text(self, request):
        return web.Response(text=self.metrics.render(), content_type="text/plain")

    async def cluster(self, request):
        eng = self.llm.engine
        state = "failed" if self.engine.error else "up"
        out = {"model": self.model_name}
        if hasattr(eng, "cluster"):
            needed = set(getattr(eng, "_needed", ()))
            out["workers"] = [dict(w, state="recovering" if w["rank"] in needed else state) for w in eng.cluster()]
            out["fault_tolerance"] = eng.fault_tolerance()
        else:
            out["workers"] = [{"rank": 0, "role": "engine", "stage": 0, "tp_rank": 0, "pid": os.getpid(),
                               "host": socket.gethostname(), "layers": [0, eng.model_config.num_layers],
                               "state": state}]
        tiers = getattr(eng, "prefix_cache_tiers", lambda: None)()
        if tiers is not None:  # each prefix-cache tier's size and occupancy, in blocks
            out["prefix_cache"] = tiers
        return web.json_response(out)

    # ------------------------------------------------------------------ generation
    async def _offload(self, fn, *args):
        """Run fn(*args) on the tokenizer pool: long work stays off the event loop and the engine."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _body(self, request):
        try:
            raw = await asyncio.wait_for(request.read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise HttpError(f"the request body did not arrive within {self.limits.body_timeout:g} s", 408) from None
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(f"the request body is larger than {self.limits.max_body_bytes} bytes", 413) from None
        try:
            body = await self._offload(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"the model {model!r} does not exist; this server serves {self.model_name!r}", "model", 404)
        return body

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

    async def _generate(self, request, chat: bool):
        streams: list[Stream] = []
        try:
            body = await self._body(request)
            req = parse_sampling(body, chat=chat, vocab_size=self.bounds.vocab_size)
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
            return self._refuse(streams, error(e.status, str(e), "NotFoundError" if e.status == 404
                                               else "invalid_request_error", e.param))
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

    async def _cancel_all(self, app) -> None:
        """Shutdown: every running request ends now with an error (its handler then returns)."""
        self._closing = True
        for s in list(self._active):
            s.updates.put_nowait(("error", SHUTTING_DOWN, 503))
            self.engine.abort(s)
        if self._active:
            log.warning("shutdown: ended %d running request(s)", len(self._active))

    async def _wait(self, s: Stream):
        while True:
            kind, *rest = await s.updates.get()
            if kind == "error":
                raise HttpError(rest[0], rest[1])
            if rest[1]:
                return

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
        return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                  "created": int(time.time()), "model": self.model_name, "choices": choices,
                                  "usage": usage(streams, req)})

    async def _stream(self, request, rid, streams: list[Stream], chat, req: Request):
        """Server-sent events; with n > 1 the choices' chunks interleave, each with its index."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        tok = self.llm.tokenizer

        async def send(choice, usage=None):
            chunk = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": choice}
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

    # ------------------------------------------------------------------ running
    async def _start(self, host: str, port: int) -> None:
        lim = self.limits
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     keepalive_timeout=lim.header_timeout, shutdown_timeout=lim.shutdown_timeout)
        await self._runner.setup()
        self._site = CappedSite(self._runner, host, port, lim.max_connections,
                                on_refuse=lambda: self.metrics.inc("dejavu_http_connections_refused_total"))
        await self._site.start()
        self.port = self._site.port

    def start_background(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve from a background thread (tests, the demo); returns the port."""
        ready = threading.Event()

        def main():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start(host, port))
            ready.set()
            self._loop.run_forever()
        self._thread = threading.Thread(target=main, name="http", daemon=True)
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("the HTTP server did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                fut.result(15)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(15)
        self._close()

    def _close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
        self.llm.shutdown()

    def serve_forever(self, host: str, port: int) -> None:
        """Blocks; SIGINT/SIGTERM stop the server: running requests end at once with an error
        (a stream gets an error event, then [DONE]), then the engine and every worker stop."""
        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await self._start(host, port)
            except OSError as e:  # e.g. the port is taken: a clear error, not a traceback
                raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
            log.warning("serving on %s", self._site.name)
            await stop.wait()
            log.warning("stopping")
            await self._runner.cleanup()
        try:
            asyncio.run(main())
        finally:
            self._close()
