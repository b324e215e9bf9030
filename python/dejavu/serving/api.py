"""`dejavu serve`: the OpenAI-compatible HTTP API over an AsyncEngine (aiohttp).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events; serving/openai_routes.py), and GET /v1/models, /health, /metrics (Prometheus),
/v1/cluster, vLLM's /tokenize, /detokenize, /version (serving/utility_routes.py). Errors use
OpenAI's shape (serving/http_errors.py). A client that disconnects cancels its request and frees
its KV blocks.

The event loop only moves bytes: JSON decoding, tokenization and the chat template run on a small
thread pool (never on the loop, nor on the engine thread), so a huge prompt delays only itself.
Connection, timeout and size limits: serving/http_limits.py. Shutdown (SIGINT/SIGTERM, stop())
ends every running request with an error at once instead of waiting for it to finish.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .async_engine import AsyncEngine, Stream
from .http_errors import SHUTTING_DOWN, HttpError, bad_request, error
from .http_limits import CappedSite, HttpLimits
from .openai_routes import OpenAIRoutes
from .protocol import BadRequest, PromptBounds, max_prompt_chars
from .utility_routes import add_routes

log = logging.getLogger("dejavu.server")


class ApiServer(OpenAIRoutes):
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
        from .. import __version__
        # OpenAI's system_fingerprint: changes when the server's version or its model does.
        self.fingerprint = "fp_" + hashlib.sha256(f"dejavu {__version__} {model_name}".encode()).hexdigest()[:10]
        self._ignored_fields: set[str] = set()  # unknown request fields already logged
        app = web.Application(middlewares=[self._auth], client_max_size=self.limits.max_body_bytes)
        app.on_shutdown.append(self._cancel_all)
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat)])
        add_routes(self, app)
        self.app = app
        self._runner: web.AppRunner | None = None
        self._site: CappedSite | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ middleware and requests
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

    def not_found_model(self, name) -> web.Response:
        return error(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                     "NotFoundError", "model")

    async def guarded(self, fn):
        """fn()'s response, or the error response for a bad request or a failed body read."""
        try:
            return await fn()
        except BadRequest as e:
            return bad_request(e)
        except HttpError as e:
            return error(e.status, str(e))

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

    async def _cancel_all(self, app) -> None:
        """Shutdown: every running request ends now with an error (its handler then returns)."""
        self._closing = True
        for s in list(self._active):
            s.updates.put_nowait(("error", SHUTTING_DOWN, 503))
            self.engine.abort(s)
        if self._active:
            log.warning("shutdown: ended %d running request(s)", len(self._active))

    # ------------------------------------------------------------------ running
    async def _start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        lim = self.limits
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     keepalive_timeout=lim.header_timeout, shutdown_timeout=lim.shutdown_timeout)
        await self._runner.setup()
        self._site = CappedSite(self._runner, host, port, lim.max_connections, sock=sock,
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

    def serve_forever(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Blocks; SIGINT/SIGTERM stop the server: running requests end at once with an error
        (a stream gets an error event, then [DONE]), then the engine and every worker stop.
        `sock`: the address already bound (http_limits.bind_listener), so a taken port fails early."""
        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await self._start(host, port, sock)
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
