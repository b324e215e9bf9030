"""The load loop of `dejavu bench serve`: streamed requests to /v1/completions or
/v1/chat/completions, arrivals at a rate, at most --max-concurrency in flight.

Timing per request (vLLM's definitions): TTFT is send to the first chunk that carries output, ITL
the gaps between output chunks, latency (E2EL) send to the end of the stream. A chunk carries
output when it has text, token ids (our server sends them), or a content delta other than the
role-only first chat chunk; our server sends a chunk per engine step even when the text is held
back (an incomplete character), so its chunks time every step. Output tokens: the stream's usage
(stream_options.include_usage) when the server sends it, else the token ids received, else the
tokenizer's count of the text, else the output chunks.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass

import aiohttp

from .serve_data import Request

BACKENDS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass
class Target:
    """Where and how requests go."""
    url: str                      # base URL, no /v1
    backend: str = "openai"
    endpoint: str | None = None   # default: BACKENDS[backend]
    model: str | None = None
    api_key: str | None = None
    ignore_eos: bool = True
    tokenizer: object = None      # counts output text when the server sends no usage

    @property
    def chat(self) -> bool:
        return self.backend == "openai-chat"

    @property
    def api_url(self) -> str:
        return self.url + (self.endpoint or BACKENDS[self.backend])

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _body(t: Target, req: Request) -> dict:
    body = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if t.chat:
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body.update(messages=[{"role": "user", "content": text}], max_completion_tokens=req.output_len)
    else:
        body.update(prompt=req.prompt, max_tokens=req.output_len)
    if t.ignore_eos:
        body["ignore_eos"] = True
    if t.model:
        body["model"] = t.model
    return body


def _output_of(chunk: dict, chat: bool) -> tuple[str, list, bool]:
    """(text, token ids, carries output) of one streamed chunk's first choice."""
    if not chunk.get("choices"):
        return "", [], False
    c = chunk["choices"][0]
    if chat:
        delta = c.get("delta") or {}
        text = delta.get("content") or ""
        return text, [], bool(text) or ("content" in delta and "role" not in delta)
    text, ids = c.get("text") or "", c.get("token_ids") or []
    return text, ids, bool(text) or bool(ids)


async def request(session: aiohttp.ClientSession, t: Target, req: Request, rec: dict) -> None:
    """Sends one request and fills rec: ok, error, ttft, latency, itl, output_tokens, prompt_tokens,
    output (the token ids where the stream carries them, else the text)."""
    rec.update(ok=False, error="", prompt_tokens=req.prompt_len)
    stamps, text, ids, usage = [], [], [], None
    t0 = time.perf_counter()
    try:
        async with session.post(t.api_url, json=_body(t, req), headers=t.headers) as r:
            if r.status != 200:
                rec["error"] = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for raw in r.content:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    err = chunk["error"]
                    rec["error"] = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                piece, new_ids, carries = _output_of(chunk, t.chat)
                if carries:
                    stamps.append(time.perf_counter())
                    text.append(piece)
                    ids += new_ids
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, AttributeError, TypeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return
    end = time.perf_counter()
    if usage and isinstance(usage.get("completion_tokens"), int):
        n = usage["completion_tokens"]
    elif ids:
        n = len(ids)
    elif t.tokenizer is not None:
        n = len(t.tokenizer.encode("".join(text)))
    else:
        n = len(stamps)
    if usage and isinstance(usage.get("prompt_tokens"), int):
        rec["prompt_tokens"] = usage["prompt_tokens"]
    rec.update(ok=True, output=ids or "".join(text), ttft=(stamps[0] - t0) if stamps else end - t0,
               latency=end - t0, output_tokens=n,
               itl=[b - a for a, b in zip(stamps, stamps[1:])], normalized=(end - t0) / max(n, 1))


class Progress:
    """tqdm when installed, else a text bar; only on a terminal (stderr)."""

    def __init__(self, total: int, enabled: bool, use_tqdm: bool = True):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled and sys.stderr.isatty()
        if self.enabled and use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, unit="req")

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            n = int(30 * self.done / self.total)
            print(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between consecutive arrivals: gamma with mean 1/rate (burstiness 1: Poisson)."""
    if rate == float("inf"):
        return [0.0] * max(n - 1, 0)
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(max(n - 1, 0))]


async def run_load(t: Target, requests: list[Request], rate: float, seed: int = 0, burstiness: float = 1.0,
                   max_concurrency: int | None = None, progress: Progress | None = None, on_start=None):
    """Every request, arriving `rate` per second; returns (records, duration). Each record has
    t_start (sent, after waiting for a concurrency slot) and t_end, in seconds since the start.
    on_start(start) may return a coroutine run beside the load (the failover kill)."""
    records = [dict(requested_output=r.output_len) for r in requests]
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def fire(i):
            if slots is not None:
                await slots.acquire()
            try:
                records[i]["t_start"] = time.perf_counter() - start
                await request(session, t, requests[i], records[i])
                records[i]["t_end"] = time.perf_counter() - start
            finally:
                if slots is not None:
                    slots.release()
            if progress is not None:
                progress.update()
        tasks = []
        start = time.perf_counter()
        if on_start is not None:
            tasks.append(asyncio.create_task(on_start(start)))
        for i in range(len(requests)):
            tasks.append(asyncio.create_task(fire(i)))
            if i < len(gaps) and gaps[i] > 0:
                await asyncio.sleep(gaps[i])
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if progress is not None:
        progress.close()
    return records, duration


def peak_concurrency(records: list[dict]) -> int:
    """Most requests in flight at once, from their t_start / t_end."""
    events = sorted([(r["t_start"], 1) for r in records if "t_end" in r] +
                    [(r["t_end"], -1) for r in records if "t_end" in r], key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak
