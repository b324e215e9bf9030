"""`dejavu bench serve`: a load generator for an OpenAI-compatible server (ours or any other).

Requests arrive as a Poisson process at --rate per second (inf: all at once). Each is a streamed
/v1/completions call with a prompt of exactly the requested number of token ids and
max_tokens = the requested output length with ignore_eos, so lengths are what the trace says.
Lengths come from a trace (a JSON list of [prompt_tokens, output_tokens]) or from the synthetic
chat-like distribution: log-normal prompts (median 200 tokens, sigma 0.9) and outputs (median
100, sigma 0.8), clipped to [4, --max-prompt] and [1, --max-output] - long-tailed like chat logs.
Reported: throughput, time to first token, inter-token latency (between streamed chunks) and
normalized latency (request latency / output tokens), at p50/p95/p99.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time

import aiohttp

from . import write_json


def synthetic_lengths(n: int, seed: int, max_prompt: int, max_output: int, prompt_median: float = 200,
                      output_median: float = 100) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = int(round(rng.lognormvariate(math.log(prompt_median), 0.9)))
        o = int(round(rng.lognormvariate(math.log(output_median), 0.8)))
        out.append((min(max(p, 4), max_prompt), min(max(o, 1), max_output)))
    return out


def load_trace(path: str) -> list[tuple[int, int]]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(x, list) and len(x) == 2 and all(
            isinstance(v, int) and v > 0 for v in x) for x in data):
        raise ValueError(f"trace {path} must be a JSON list of [prompt_tokens, output_tokens] positive integers")
    return [tuple(x) for x in data]


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
    return {"p50": q(50), "p95": q(95), "p99": q(99), "mean": sum(s) / len(s)}


async def _one(session, url, model, prompt_ids, out_len, headers, rec):
    body = {"prompt": prompt_ids, "max_tokens": out_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    stamps = []
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:
                rec.update(ok=False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
                return
            tokens = None
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    stamps.append(time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}")
        return
    end = time.perf_counter()
    n = tokens or out_len
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    rec.update(ok=True, ttft=(stamps[0] - t0) if stamps else end - t0, latency=end - t0, output_tokens=n,
               itl=itl, normalized=(end - t0) / max(n, 1))


async def _run(url, model, lengths, rate, seed, api_key, progress, kill=None):
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records = [dict(prompt_tokens=p, requested_output=o) for p, o in lengths]
    timeout = aiohttp.ClientTimeout(total=3600)
    done = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def fire(i):
            nonlocal done
            p, o = lengths[i]
            ids = [rng.randrange(100, 1000) for _ in range(p)]
            records[i]["t_start"] = time.perf_counter() - start
            await _one(session, url, model, ids, o, headers, records[i])
            records[i]["t_end"] = time.perf_counter() - start
            done += 1
            if progress:
                bar = int(30 * done / len(lengths))
                print(f"\r[{'#' * bar}{'.' * (30 - bar)}] {done}/{len(lengths)}", end="", file=sys.stderr, flush=True)
        tasks = []
        start = time.perf_counter()
        if kill is not None:
            tasks.append(asyncio.create_task(_kill_later(url, headers, kill, start)))
        for i in range(len(lengths)):
            tasks.append(asyncio.create_task(fire(i)))
            if rate != float("inf") and i + 1 < len(lengths):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    return records, duration


def _cluster(url: str, headers: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url + "/v1/cluster", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def find_worker(cluster: dict, spec: str) -> dict:
    """ROLE:STAGE (stage, token or prompt; TP rank 0) -> that worker's /v1/cluster entry."""
    role, _, stage = spec.partition(":")
    if role not in ("stage", "token", "prompt") or not stage.isdigit():
        raise ValueError(f"--kill-worker wants ROLE:STAGE with ROLE stage, token or prompt, got {spec!r}")
    for w in cluster.get("workers", []):
        if w.get("role") == role and w.get("stage") == int(stage) and w.get("tp_rank", 0) == 0:
            return w
    raise ValueError(f"no {role} worker at stage {stage} in /v1/cluster "
                     f"({', '.join(str(w.get('worker')) for w in cluster.get('workers', []))})")


async def _kill_later(url, headers, kill, start):
    import os
    import signal

    spec, at, out = kill
    await asyncio.sleep(at)
    w = find_worker(await asyncio.to_thread(_cluster, url, headers), spec)
    os.kill(int(w["pid"]), signal.SIGKILL)
    out.update(worker=w["worker"], pid=w["pid"], at=time.time(), t=time.perf_counter() - start)


def run_failover(url: str, lengths, rate: float, spec: str, kill_at: float, model=None, seed: int = 0,
                 api_key: str | None = None, json_path: str | None = None) -> dict:
    """The same load twice after a short warm-up: failure-free, then with `spec` killed `kill_at`
    seconds in. Reports the latency inflation of the requests in flight at the kill (same request,
    same arrival time, in both passes) and the server's recovery time split into its parts (from
    /v1/cluster)."""
    url = _base_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    find_worker(_cluster(url, headers), spec)  # a bad spec fails before any load
    # Warm-up (first-use costs of a fresh deployment would otherwise inflate the baseline pass).
    asyncio.run(_run(url, model, [(p, min(o, 16)) for p, o in lengths[:4]], float("inf"), seed, api_key, False))
    base, base_s = asyncio.run(_run(url, model, lengths, rate, seed, api_key, False))
    killed: dict = {}
    fail, fail_s = asyncio.run(_run(url, model, lengths, rate, seed, api_key, False, kill=(spec, kill_at, killed)))
    if not killed:
        raise RuntimeError(f"the load finished before --kill-at {kill_at}s: nothing was killed")
    ft = _cluster(url, headers).get("fault_tolerance", {})
    events = [e for e in ft.get("recoveries", []) if e["at"] >= killed["at"] - 1.0]
    affected = [i for i, r in enumerate(fail) if r.get("ok") and r["t_start"] < killed["t"] < r["t_end"]]
    infl = [fail[i]["latency"] / base[i]["latency"] for i in affected if base[i].get("ok")]
    rec = {}
    if events:
        e = events[0]
        rec = {"detect_s": max(0.0, e["at"] - killed["at"]), "respawn_s": e["respawn_s"],
               "weights_s": e.get("weights_s", 0.0),
               "kv_fetch_s": e["kv_fetch_s"], "recovery_s": e["total_s"],
               "recomputed_tokens": e["recomputed_tokens"], "bad_replicas": e["bad_replicas"],
               "replicated": e["replicated"]}
    result = {"url": url, "killed": killed, "recovery": rec,
              "baseline": _pass_summary(base, base_s), "failure": _pass_summary(fail, fail_s),
              "affected_requests": len(affected), "latency_inflation": percentiles(infl) | {"max": max(infl, default=None)}}
    return _report(result, format_failover(result), json_path)


def _base_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _pass_summary(records: list[dict], duration: float) -> dict:
    """Counts, throughput and the first errors of one pass of the load."""
    ok = [r for r in records if r.get("ok")]
    return {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
            "throughput_output_tokens_per_s": sum(r["output_tokens"] for r in ok) / duration,
            "errors": sorted({r["error"] for r in records if not r.get("ok")})[:5]}


def _report(result: dict, text: str, json_path: str | None) -> dict:
    print(text)
    write_json(json_path, result)
    return result


def format_failover(r: dict) -> str:
    k, rec, li = r["killed"], r["recovery"], r["latency_inflation"]
    lines = [f"killed {k['worker']} (pid {k['pid']}) {k['t']:.2f}s into the pass; "
             f"{r['failure']['completed']}/{r['failure']['requests']} requests completed "
             f"(failure-free pass: {r['baseline']['completed']}/{r['baseline']['requests']})"]
    if rec:
        lines.append(f"  recovery {rec['recovery_s']:.2f}s after detection {rec['detect_s']:.2f}s (respawn "
                     f"{rec['respawn_s']:.2f}s of which weights {rec['weights_s']:.2f}s, KV fetch "
                     f"{rec['kv_fetch_s']:.3f}s); replication "
                     f"{'on' if rec['replicated'] else 'off'}; {rec['recomputed_tokens']} tokens recomputed")
    else:
        lines.append("  no recovery recorded by the server (/v1/cluster)")
    if li["p50"] is not None:
        lines.append(f"  {r['affected_requests']} requests in flight at the kill: latency x{li['mean']:.2f} mean, "
                     f"x{li['p50']:.2f} p50, x{li['max']:.2f} max against the failure-free pass")
    else:
        lines.append("  no request was in flight at the kill (the pass ended before it): nothing measured; "
                     "use an earlier --kill-at or a longer load")
    lines.append(f"  throughput {r['failure']['throughput_output_tokens_per_s']:.1f} vs "
                 f"{r['baseline']['throughput_output_tokens_per_s']:.1f} output tok/s failure-free")
    return "\n".join(lines)


def run(url: str, lengths: list[tuple[int, int]], rate: float, model: str | None = None, seed: int = 0,
        api_key: str | None = None, json_path: str | None = None, progress: bool = True) -> dict:
    url = _base_url(url)
    records, duration = asyncio.run(_run(url, model, lengths, rate, seed, api_key, progress))
    ok = [r for r in records if r.get("ok")]
    summary = _pass_summary(records, duration)
    result = {
        "url": url, **summary, "rate": rate if rate != float("inf") else "inf",
        "throughput_requests_per_s": len(ok) / duration,
        "total_prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "total_output_tokens": sum(r["output_tokens"] for r in ok),
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "normalized_latency_s_per_token": percentiles([r["normalized"] for r in ok]),
        "latency_s": percentiles([r["latency"] for r in ok]),
    }
    return _report(result, format_report(result), json_path)


def format_report(r: dict) -> str:
    def row(name, d, unit=1000.0, suffix="ms"):
        if d["p50"] is None:
            return f"  {name:<30} n/a"
        return (f"  {name:<30} p50 {d['p50'] * unit:8.1f} {suffix}  p95 {d['p95'] * unit:8.1f} {suffix}  "
                f"p99 {d['p99'] * unit:8.1f} {suffix}")
    lines = [f"{r['completed']}/{r['requests']} requests in {r['duration_s']:.1f}s (rate {r['rate']}/s): "
             f"{r['throughput_requests_per_s']:.2f} req/s, {r['throughput_output_tokens_per_s']:.1f} output tok/s",
             row("time to first token", r["ttft_s"]), row("inter-token latency", r["itl_s"]),
             row("normalized latency (per token)", r["normalized_latency_s_per_token"]),
             row("request latency", r["latency_s"], 1.0, "s ")]
    if r["failed"]:
        lines.append(f"  failures: {r['failed']} ({'; '.join(r['errors'])})")
    return "\n".join(lines)
