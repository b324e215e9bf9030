"""`dejavu bench serve --kill-worker ROLE:STAGE`: the same load twice after a short warm-up,
failure-free and then with one worker killed (SIGKILL, same host) --kill-at seconds in; reports
the latency inflation of the requests in flight at the kill and the time from the kill to the
first token streamed after the recovery, split into detection, replacement (of which weights),
KV fetch, the rest of the recovery (reset, re-forming the pipes) and the first token (from the
server's recovery event in /v1/cluster and the clients' token arrival times)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from dataclasses import replace

from .serve_client import Target, run_load
from .serve_data import Request


def _cluster(url: str, headers: dict) -> dict:
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


def _killer(t: Target, spec: str, at: float, out: dict):
    async def kill(start: float):
        await asyncio.sleep(at)
        w = find_worker(await asyncio.to_thread(_cluster, t.url, t.headers), spec)
        os.kill(int(w["pid"]), signal.SIGKILL)
        out.update(worker=w["worker"], pid=w["pid"], at=time.time(), t=time.perf_counter() - start)
    return kill


def pass_summary(records: list[dict], duration: float) -> dict:
    """Counts, throughput and the first errors of one pass of the load."""
    ok = [r for r in records if r.get("ok")]
    return {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
            "throughput_output_tokens_per_s": sum(r["output_tokens"] for r in ok) / duration,
            "errors": sorted({r["error"] for r in records if not r.get("ok")})[:5]}


def token_times(r: dict) -> list[float]:
    """When each streamed chunk of a completed request arrived, in seconds since its pass began."""
    t = r["t_start"] + r["ttft"]
    out = [t]
    for gap in r.get("itl", []):
        t += gap
        out.append(t)
    return out


def split_recovery(e: dict, killed: dict, records: list[dict]) -> dict:
    """Kill -> first resumed token in parts: detection (kill -> recovery starts), replacement
    (respawn_s, of which weights_s), KV fetch, the rest of the recovery, and the first token (the
    recovery's end -> the first chunk any client got after it). The kill and the recovery event are
    on the same host's wall clock; token times on the pass's own clock, anchored at the kill."""
    resume = killed["t"] + (e["at"] - killed["at"]) + e["total_s"]
    after = [t for r in records if r.get("ok") for t in token_times(r) if t > resume]
    first = min(after, default=None)
    parts = {"detect_s": max(0.0, e["at"] - killed["at"]), "respawn_s": e["respawn_s"],
             "weights_s": e.get("weights_s", 0.0), "weights_from": e.get("weights_from"),
             "kv_fetch_s": e["kv_fetch_s"], "kv_local": e.get("kv_local"), "kv_bytes": e.get("kv_bytes", 0),
             "rest_s": max(0.0, e["total_s"] - e["respawn_s"] - e["kv_fetch_s"]), "recovery_s": e["total_s"],
             "ready_parts": e.get("ready_parts", {}), "restore_parts": e.get("restore_parts", {}),
             "controller": {k: e[k] for k in ("reset_s", "ready_s", "first_step_sent_s", "first_step_s") if k in e},
             "first_token_s": None if first is None else first - resume,
             "to_first_token_s": None if first is None else first - killed["t"]}
    return parts


def _await_spares(t: Target, wait: float = 120.0) -> None:
    """Before the failure pass: the deployment's warm spares have registered (they start after the
    workers and take a while; a kill before would measure a cold start)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ft = _cluster(t.url, t.headers).get("fault_tolerance", {})
        if len(ft.get("standbys", [])) >= ft.get("spare_workers", 0):
            return
        time.sleep(0.5)


def _recovery_events(t: Target, killed_at: float, wait: float = 30.0) -> list[dict]:
    """The server's recoveries since the kill, waiting up to `wait` s for the first: a kill that lands
    as the pass ends is detected and recovered after its last request."""
    deadline = time.monotonic() + wait
    while True:
        ft = _cluster(t.url, t.headers).get("fault_tolerance", {})
        events = [e for e in ft.get("recoveries", []) if e["at"] >= killed_at - 1.0]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


def run_failover(t: Target, requests: list[Request], rate: float, spec: str, kill_at: float, seed: int = 0,
                 burstiness: float = 1.0, max_concurrency: int | None = None) -> dict:
    from .serve import percentiles

    find_worker(_cluster(t.url, t.headers), spec)  # a bad spec fails before any load
    # Warm-up (first-use costs of a fresh deployment would otherwise inflate the baseline pass).
    warm = [replace(r, output_len=min(r.output_len, 16)) for r in requests[:4]]
    asyncio.run(run_load(t, warm, float("inf"), seed))
    load = dict(seed=seed, burstiness=burstiness, max_concurrency=max_concurrency)
    base, base_s = asyncio.run(run_load(t, requests, rate, **load))
    _await_spares(t)
    killed: dict = {}
    fail, fail_s = asyncio.run(run_load(t, requests, rate, **load, on_start=_killer(t, spec, kill_at, killed)))
    if not killed:
        raise RuntimeError(f"the load finished before --kill-at {kill_at}s: nothing was killed")
    events = _recovery_events(t, killed["at"])
    affected = [i for i, r in enumerate(fail) if r.get("ok") and r["t_start"] < killed["t"] < r["t_end"]]
    infl = [fail[i]["latency"] / base[i]["latency"] for i in affected if base[i].get("ok")]
    rec = {}
    if events:
        e = events[0]
        rec = split_recovery(e, killed, fail) | {"recomputed_tokens": e["recomputed_tokens"],
                                                 "bad_replicas": e["bad_replicas"], "replicated": e["replicated"]}
    itl = [g for r in base if r.get("ok") for g in r.get("itl", [])]
    return {"url": t.url, "killed": killed, "recovery": rec, "baseline_itl": percentiles(itl),
            "baseline": pass_summary(base, base_s), "failure": pass_summary(fail, fail_s),
            "affected_requests": len(affected), "latency_inflation": percentiles(infl) | {"max": max(infl, default=None)}}


def _kv_path(rec: dict) -> str:
    """How the KV came back, and how fast: "312 MB through shared memory, 11.2 GB/s"."""
    if rec.get("kv_local") is None:
        return "none"
    how = "shared memory" if rec["kv_local"] else "TCP"
    n, s = rec.get("kv_bytes", 0), rec["kv_fetch_s"]
    return f"{n / 1e6:.0f} MB through {how}" + (f", {n / s / 1e9:.1f} GB/s" if s > 0 else "")


def format_failover(r: dict) -> str:
    k, rec, li = r["killed"], r["recovery"], r["latency_inflation"]
    lines = [f"killed {k['worker']} (pid {k['pid']}) {k['t']:.2f}s into the pass; "
             f"{r['failure']['completed']}/{r['failure']['requests']} requests completed "
             f"(failure-free pass: {r['baseline']['completed']}/{r['baseline']['requests']})"]
    if rec:
        total = rec["to_first_token_s"]
        first = "no token after the recovery" if total is None else f"first token {rec['first_token_s']:.3f}s"
        lines.append(f"  kill -> first resumed token {'-' if total is None else f'{total:.3f}s'}: detection "
                     f"{rec['detect_s']:.3f}s + replacement {rec['respawn_s']:.3f}s (weights {rec['weights_s']:.3f}s, "
                     f"{rec['weights_from'] or '-'}) + KV fetch {rec['kv_fetch_s']:.3f}s "
                     f"({_kv_path(rec)}) + "
                     f"rest {rec['rest_s']:.3f}s + {first}")
        for name, key in (("replacement", "ready_parts"), ("KV fetch", "restore_parts"),
                          ("controller timeline", "controller")):
            if rec.get(key):
                lines.append(f"  {name} by phase: " + ", ".join(f"{k} {v:.3f}s" for k, v in rec[key].items()))
        itl = r.get("baseline_itl", {}).get("p50")
        lines.append(f"  recovery {rec['recovery_s']:.3f}s; replication {'on' if rec['replicated'] else 'off'}; "
                     f"{rec['recomputed_tokens']} tokens recomputed; failure-free inter-token p50 "
                     f"{'-' if itl is None else f'{itl * 1000:.1f} ms'}")
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
