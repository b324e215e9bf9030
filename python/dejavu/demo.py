"""`dejavu demo`: a local deployment of the default model, exercised through its HTTP API.

Starts a disaggregated deployment (one prompt worker and one token worker by default; GPU when
present, else CPU) and the OpenAI-compatible server on a free loopback port, streams one answer to the terminal, sends a batch of real prompts concurrently,
and prints a summary (throughput, latency percentiles, KV blocks, bytes streamed) read from the
responses and the server's own /metrics.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request

import aiohttp

from .bench.serve import percentiles

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in one paragraph why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a friendly robot.",
    "How many legs does a spider have?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def _metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _chat(session, base, model, prompt, max_tokens, echo: bool):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, n, text = None, 0, []
    async with session.post(base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = c["delta"].get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text.append(piece)
                if echo and piece:
                    print(piece, end="", flush=True)
    return {"prompt": prompt, "text": "".join(text), "tokens": n, "ttft": first or 0.0,
            "latency": time.perf_counter() - t0}


async def _drive(base, model, max_tokens):
    async with aiohttp.ClientSession() as session:
        print(f"\n>>> {PROMPTS[0]}\n", flush=True)
        streamed = await _chat(session, base, model, PROMPTS[0], max_tokens, echo=True)
        print("\n")
        t0 = time.perf_counter()
        batch = await asyncio.gather(*[_chat(session, base, model, p, max_tokens, False) for p in PROMPTS[1:]])
        wall = time.perf_counter() - t0
    return streamed, batch, wall


def run(model: str, device: str, max_tokens: int, pp: int = 1, tp: int = 1, prompt_stages: int = 1,
        token_stages: int = 1) -> int:
    from . import LLM
    from .serving.api import ApiServer

    t0 = time.perf_counter()
    layout = (f"disaggregated: {prompt_stages} prompt + {token_stages} token stage(s)" if prompt_stages
              else f"pp={pp}")
    print(f"[demo] loading {model} on {device} ({layout}, tp={tp}) ...", file=sys.stderr, flush=True)
    llm = LLM(model=model, device=device, pp=pp, tp=tp, prompt_stages=prompt_stages, token_stages=token_stages)
    server = ApiServer(llm, model)
    port = server.start_background()
    base = f"http://127.0.0.1:{port}"
    print(f"[demo] serving at {base}/v1 (ready in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    try:
        streamed, batch, wall = asyncio.run(_drive(base, model, max_tokens))
        blocks_total = _metric(base, "dejavu_kv_blocks_total")
        streamed_bytes = _metric(base, 'dejavu_kv_bytes_streamed_total{kind="prompt_to_token"}')
        cluster = json.loads(urllib.request.urlopen(base + "/v1/cluster", timeout=10).read())["workers"]
    finally:
        server.stop()
    toks = sum(r["tokens"] for r in batch)
    ttft = percentiles([r["ttft"] for r in batch])
    lat = percentiles([r["latency"] for r in batch])
    print("-" * 68)
    for r in batch:
        print(f"  {r['prompt'][:38]:<38} -> {r['text'][:60].strip()!r}"[:110])
    print("-" * 68)
    print(f"  model                     {model} on {llm.device}")
    print(f"  deployment                {layout}, tp={tp}: "
          + ", ".join(f"{w['role']} {w.get('stage', 0)}.{w.get('tp_rank', 0)} (pid {w['pid']})" for w in cluster))
    print(f"  requests                  1 streamed + {len(batch)} concurrent")
    print(f"  batch throughput          {toks / wall:.1f} output tok/s ({toks} tokens in {wall:.1f}s)")
    print(f"  time to first token       p50 {ttft['p50'] * 1000:.0f} ms   p95 {ttft['p95'] * 1000:.0f} ms")
    print(f"  request latency           p50 {lat['p50']:.2f} s   p95 {lat['p95']:.2f} s")
    print(f"  KV cache                  {int(blocks_total)} blocks per token worker; "
          f"{streamed_bytes / 2**20:.1f} MiB of KV streamed prompt -> token")
    print(f"  streamed answer           {streamed['tokens']} tokens, first after {streamed['ttft'] * 1000:.0f} ms")
    return 0
