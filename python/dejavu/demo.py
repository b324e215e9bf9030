"""`dejavu demo`: a local deployment of the default model, exercised through its HTTP API.

Starts a disaggregated deployment (one prompt worker and two token workers by default, with KV
replication; GPU when present, else CPU) and the OpenAI-compatible server on a free loopback port,
streams one answer to the terminal, sends a batch of real prompts concurrently, kills a token
worker (SIGKILL) in the middle of that batch, and prints a summary (throughput, latency
percentiles, KV blocks, bytes streamed, the recovery) read from the responses and the server's
own /metrics and /v1/cluster.
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


async def _kill_mid_batch(llm, spec: str, killed: dict) -> None:
    """Once the batch has produced some tokens, kill -9 the worker `spec` (ROLE:STAGE)."""
    import os
    import signal

    from .bench.serve import find_worker

    eng = llm.engine
    w = find_worker({"workers": eng.cluster()}, spec)
    start = eng.num_generated
    while eng.num_generated < start + 3 * len(PROMPTS):
        await asyncio.sleep(0.01)
    os.kill(int(w["pid"]), signal.SIGKILL)
    killed.update(worker=w["worker"], pid=w["pid"])
    print(f"[demo] killed worker {w['worker']} (pid {w['pid']}) in the middle of the batch", file=sys.stderr,
          flush=True)


async def _drive(base, model, max_tokens, llm=None, kill=None, killed=None):
    async with aiohttp.ClientSession() as session:
        print(f"\n>>> {PROMPTS[0]}\n", flush=True)
        streamed = await _chat(session, base, model, PROMPTS[0], max_tokens, echo=True)
        print("\n")
        t0 = time.perf_counter()
        killer = asyncio.create_task(_kill_mid_batch(llm, kill, killed)) if kill else None
        batch = await asyncio.gather(*[_chat(session, base, model, p, max_tokens, False) for p in PROMPTS[1:]])
        wall = time.perf_counter() - t0
        if killer is not None and not killer.done():
            killer.cancel()
    return streamed, batch, wall


def run(model: str, device: str, max_tokens: int, pp: int = 1, tp: int = 1, prompt_stages: int = 1,
        token_stages: int = 2, replicate: bool = True, kill: str | None = "token:1") -> int:
    from . import LLM
    from .serving.api import ApiServer

    t0 = time.perf_counter()
    layout = (f"disaggregated: {prompt_stages} prompt + {token_stages} token stage(s)" if prompt_stages
              else f"pp={pp}")
    stages = token_stages if prompt_stages else pp
    replicate = replicate and stages >= 2
    if stages < 2 and kill and not kill.startswith("prompt"):
        kill = None  # a lone decode worker's KV cannot be replicated
    print(f"[demo] loading {model} on {device} ({layout}, tp={tp}{', KV replication' if replicate else ''}) ...",
          file=sys.stderr, flush=True)
    llm = LLM(model=model, device=device, pp=pp, tp=tp, prompt_stages=prompt_stages, token_stages=token_stages,
              replicate=replicate)
    server = ApiServer(llm, model)
    port = server.start_background()
    base = f"http://127.0.0.1:{port}"
    print(f"[demo] serving at {base}/v1 (ready in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    try:
        killed: dict = {}
        streamed, batch, wall = asyncio.run(_drive(base, model, max_tokens, llm, kill, killed))
        blocks_total = _metric(base, "dejavu_kv_blocks_total")
        streamed_bytes = _metric(base, 'dejavu_kv_bytes_streamed_total{kind="prompt_to_token"}')
        info = json.loads(urllib.request.urlopen(base + "/v1/cluster", timeout=10).read())
        cluster = info["workers"]
        ft = info.get("fault_tolerance") or {}
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
    for e in ft.get("recoveries", []):
        bad = f", {e['bad_replicas']} replicas unusable" if e["bad_replicas"] else ""
        kv = " (KV replicated)" if e["replicated"] else ""
        print(f"  failure                   {', '.join(e['workers'])} killed mid-batch: replaced and resumed in "
              f"{e['total_s']:.1f}s (respawn + weights {e['respawn_s']:.1f}s, KV fetch {e['kv_fetch_s'] * 1000:.0f} ms); "
              f"{e['recomputed_tokens']} tokens recomputed{kv}{bad}; all {len(batch)} requests completed")
    return 0
