"""Decode throughput of a pipeline with and without KV replication, alternating in one command
(same requests): the cost of --replicate on the serving path.

  python benchmarks/replication_overhead.py --model random:opt-1.3b --device cuda --pairs 4
      one deployment, replication paused and resumed between runs (default: no noise from
      different deployments)
  ... --fresh      a fresh deployment for every run instead
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dejavu import LLM, SamplingParams  # noqa: E402


def one(args, replicate: bool) -> dict:
    llm = LLM(model=args.model, device=args.device, pp=args.pp, replicate=replicate,
              kv_cache_memory=args.kv_cache_gib << 30)
    try:
        prompts = [[100 + i] * args.prompt_len for i in range(args.requests)]
        llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        dt = time.perf_counter() - t
        pending = len(getattr(llm.engine, "_rep_pending", {}))  # steps whose replication was not acknowledged yet
    finally:
        llm.shutdown()
    return {"replicate": replicate, "tok_s": args.requests * args.max_tokens / dt, "unacknowledged_steps": pending}


def same_deployment(args) -> list[dict]:
    """One replicating deployment; LLM.engine.set_replication toggles it between runs."""
    llm = LLM(model=args.model, device=args.device, pp=args.pp, replicate=True,
              kv_cache_memory=args.kv_cache_gib << 30)
    rows = []
    try:
        prompts = [[100 + i] * args.prompt_len for i in range(args.requests)]
        llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        for _ in range(args.pairs):
            for rep in (False, True):
                llm.engine.set_replication(rep)
                t = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
                dt = time.perf_counter() - t
                rows.append({"replicate": rep, "tok_s": args.requests * args.max_tokens / dt,
                             "unacknowledged_steps": len(llm.engine._rep_pending)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        llm.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:opt-125m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2, help="(off, on) pairs, alternating")
    ap.add_argument("--fresh", action="store_true", help="a fresh deployment per run instead of pausing one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.fresh:
        rows = []
        for _ in range(args.pairs):
            for rep in (False, True):
                rows.append(one(args, rep))
                print(json.dumps(rows[-1]), flush=True)
    else:
        rows = same_deployment(args)
    off = [r["tok_s"] for r in rows if not r["replicate"]]
    on = [r["tok_s"] for r in rows if r["replicate"]]
    ratios = [b / a for a, b in zip(off, on)]
    print(f"replication on / off: {', '.join(f'{x:.3f}' for x in ratios)} (mean {sum(ratios) / len(ratios):.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
