"""Prefix caching, measured (issue 46 item 6, docs/BENCHMARKS.md).

1. Serving A/B: an in-process server (`LLM` + `ApiServer`) under `dejavu bench serve`'s load
   generator, prefix caching off and on, alternating off/on `--repeat` times so both see the same
   load on a shared machine; a fresh server per pass, so every pass starts with a cold cache.
   - shared: the `prefix` dataset, one `--prefix-len` prefix for `--prefix-fraction` of the
     requests (the rest start with as many random tokens), a `--suffix-len` random suffix each;
   - none: the `random` dataset, prompts of the same total length, nothing shared (the cost of
     caching where it cannot hit).
   Reports TTFT p50/p99 and output throughput per pass, and on/off ratios of their medians.
2. Host-tier restore: N blocks restored from the pinned host tier into the device cache through
   the engine's own path (PrefixTiers.sync: one batched KVStreamer.copy_blocks call) against one contiguous
   copy of the same bytes from a pinned host buffer into device memory. On CPU both are host copies.

    python3 benchmarks/prefix_cache_ab.py --model random:llama-tiny --device cpu
    python3 benchmarks/prefix_cache_ab.py --workloads none --skip-restore --repeat 4  # the cost alone
    python3 benchmarks/prefix_cache_ab.py --model random:opt-1.3b --device cuda --dtype float16 \\
        --prefix-len 1000 --requests 64 --concurrency 8 --restore-blocks 256 --server process
`--server process` runs each pass's server in a process of its own, so the load generator does not
share a GIL with the server and the engine thread (the default, `thread`, keeps them together).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from dejavu import LLM
from dejavu.bench.serve import run as bench_run
from dejavu.bench.serve_data import random_requests
from dejavu.engine.block_manager import PrefixStats
from dejavu.engine.kv_cache import PagedKVCache
from dejavu.engine.prefix_tiers import PrefixTiers
from dejavu.models.registry import named_config
from dejavu.serving.api import ApiServer


def _server(args, caching: bool) -> tuple[ApiServer, int]:
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
              kv_cache_blocks=args.kv_cache_blocks, max_model_len=args.max_model_len,
              enable_prefix_caching=caching)
    srv = ApiServer(llm, args.model)
    return srv, srv.start_background()


def serve_child(args) -> None:
    """--server process: the server alone in this process; its port out, its prefix stats out once
    stdin closes."""
    srv, port = _server(args, args.serve_child == "on")
    print(port, flush=True)
    sys.stdin.read()
    print(json.dumps(srv.engine.engine.prefix_cache_stats() or {}), flush=True)
    srv.stop()


def one_pass(args, requests, caching: bool) -> dict:
    child = srv = None
    if args.server == "process":  # the client's and the server's Python threads do not share a GIL
        child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--serve-child", "on" if caching else "off"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = int(child.stdout.readline())
    else:
        srv, port = _server(args, caching)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            r = bench_run(f"http://127.0.0.1:{port}", requests, args.rate, progress=False,
                          max_concurrency=args.concurrency)
        if child is not None:
            stats = json.loads(child.communicate("", timeout=120)[0].strip().splitlines()[-1])
        else:
            stats = (srv.engine.engine.prefix_cache_stats() if caching else None) or {}
    finally:
        if srv is not None:
            srv.stop()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} requests failed: {sorted(set(r['errors']))[:3]}")
    return {"caching": caching, "ttft_p50_ms": r["median_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
            "out_tok_s": r["output_throughput"], "hit_tokens": stats.get("hit_tokens")}


def ab(args, name: str, requests) -> dict:
    passes = []
    for i in range(args.repeat):
        for caching in (False, True):
            p = one_pass(args, requests, caching)
            passes.append(p)
            print(f"  {name:6s} pass {i + 1} caching {'on ' if caching else 'off'}: TTFT p50 {p['ttft_p50_ms']:8.1f} ms"
                  f"  p99 {p['ttft_p99_ms']:8.1f} ms  output {p['out_tok_s']:7.1f} tok/s", flush=True)

    def med(key, caching):
        return statistics.median(p[key] for p in passes if p["caching"] == caching)
    out = {"passes": passes}
    for key in ("ttft_p50_ms", "ttft_p99_ms", "out_tok_s"):
        out[key] = {"off": med(key, False), "on": med(key, True)}
    out["ttft_p50_off_over_on"] = out["ttft_p50_ms"]["off"] / out["ttft_p50_ms"]["on"]
    out["ttft_p99_off_over_on"] = out["ttft_p99_ms"]["off"] / out["ttft_p99_ms"]["on"]
    out["throughput_on_over_off"] = out["out_tok_s"]["on"] / out["out_tok_s"]["off"]
    print(f"  {name}: TTFT p50 off/on {out['ttft_p50_off_over_on']:.2f}x, p99 off/on "
          f"{out['ttft_p99_off_over_on']:.2f}x, throughput on/off {out['throughput_on_over_off']:.3f}", flush=True)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def restore_bench(args) -> dict:
    """Median seconds of restoring N host-tier blocks (PrefixTiers.sync) vs one contiguous pinned copy."""
    cfg = named_config(args.model.removeprefix("random:"))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype, torch.float32)
    device, n = torch.device(args.device), args.restore_blocks
    cache = PagedKVCache(cfg.num_layers, 2 * n, args.block_size, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads,
                         dtype, device)
    cache.tensor.normal_()
    probe = PrefixTiers(cache, PrefixStats(), 1 << 30)
    tiers = PrefixTiers(cache, PrefixStats(), (n + 1) * probe.block_bytes)
    del probe
    names = [i.to_bytes(16, "little") for i in range(n)]
    tiers.sync(list(zip(range(n), names)), [])  # blocks 0..n-1 into the host tier
    assert len(tiers.host) == n
    total = n * tiers.block_bytes
    src = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(total, dtype=torch.uint8, device=device)

    def restore():
        seq = SimpleNamespace(restore=[(n + i, name) for i, name in enumerate(names)], num_cached=0)
        tiers.sync([], [seq])
        _sync(device)
        assert seq.num_cached == n * args.block_size

    def contiguous():
        dst.copy_(src, non_blocking=True)
        _sync(device)

    restore()
    assert torch.equal(cache.tensor[:, n:2 * n], cache.tensor[:, :n]), "restored blocks differ from the offloaded ones"
    contiguous()
    times = {"restore": [], "contiguous": []}
    for _ in range(args.restore_repeat):
        for key, fn in (("contiguous", contiguous), ("restore", restore)):
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"blocks": n, "block_bytes": tiers.block_bytes, "total_mib": total / 2**20,
           "restore_gb_s": total / med["restore"] / 1e9, "contiguous_gb_s": total / med["contiguous"] / 1e9,
           "restore_over_contiguous": med["contiguous"] / med["restore"], "repeat": args.restore_repeat}
    print(f"  restore {n} blocks x {tiers.block_bytes / 2**10:.0f} KiB ({out['total_mib']:.0f} MiB): host tier "
          f"{out['restore_gb_s']:.2f} GB/s, contiguous pinned copy {out['contiguous_gb_s']:.2f} GB/s, "
          f"ratio {out['restore_over_contiguous']:.2f}x", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-blocks", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--prefix-fraction", type=float, default=0.9)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--rate", type=float, default=float("inf"),
                    help="requests per second (Poisson; default inf: a closed loop of --concurrency clients)")
    ap.add_argument("--concurrency", type=int, default=4, help="at most this many requests in flight")
    ap.add_argument("--repeat", type=int, default=2, help="off/on pairs per workload")
    ap.add_argument("--restore-blocks", type=int, default=256)
    ap.add_argument("--restore-repeat", type=int, default=7)
    ap.add_argument("--skip-serve", action="store_true", help="only the restore microbenchmark")
    ap.add_argument("--workloads", default="shared,none", help="serving workloads to run (shared, none)")
    ap.add_argument("--skip-restore", action="store_true", help="no restore microbenchmark")
    ap.add_argument("--server", choices=("thread", "process"), default="thread",
                    help="the server in this process (a thread) or in a process of its own (no GIL shared with "
                         "the load generator)")
    ap.add_argument("--serve-child", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.serve_child:
        return serve_child(args)

    result = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch_threads": torch.get_num_threads()}
    if not args.skip_serve:
        shared = random_requests(args.requests, 0, args.suffix_len, args.output_len, prefix_len=args.prefix_len,
                                 prefix_fraction=args.prefix_fraction)
        none = random_requests(args.requests, 0, args.prefix_len + args.suffix_len, args.output_len)
        print(f"serving A/B: {args.model} on {args.device} ({args.dtype}), {args.requests} requests of "
              f"{args.prefix_len}+{args.suffix_len} prompt tokens, {args.output_len} output, rate {args.rate}/s, "
              f"concurrency {args.concurrency}", flush=True)
        one_pass(args, none[:2], False)  # warm-up (first-use costs of torch and the server), not reported
        for name, reqs in (("shared", shared), ("none", none)):
            if name in args.workloads.split(","):
                result[name] = ab(args, name, reqs)
    if not args.skip_restore:
        print("host-tier restore:", flush=True)
        result["restore"] = restore_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
