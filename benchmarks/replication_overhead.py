"""Decode throughput of a pipeline with and without KV replication, alternating in one command
(same requests): the cost of --replicate on the serving path.

Two figures per run: end-to-end tokens/s (the controller, both stages and their pipes included: on
one shared GPU this varies by +-20% between runs), and the median decode step of the sampling
stage (from its inputs at hand to its replication enqueued, measured in the worker; what the
issue's "<= 2% of a decode step" is about). Ratios are on / off of consecutive runs, and of the
medians over all runs of each kind.

  python benchmarks/replication_overhead.py --model random:opt-1.3b --device cuda --pairs 4
      one deployment, replication paused and resumed between runs (default: no noise from
      different deployments)
  ... --fresh      a fresh deployment for every run instead
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dejavu import LLM, SamplingParams  # noqa: E402
from dejavu.bench import write_json  # noqa: E402


def one(args, replicate: bool) -> dict:
    llm = LLM(model=args.model, device=args.device, pp=args.pp, replicate=replicate,
              kv_cache_memory=args.kv_cache_gib << 30)
    try:
        prompts = [[100 + i] * args.prompt_len for i in range(args.requests)]
        llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        dt = time.perf_counter() - t
        pending = len(llm.engine.replication.pending)  # steps whose replication was not acknowledged yet
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
                llm.engine.set_replication(rep, every=args.every)
                llm.engine.decode_steps.clear()
                t = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
                dt = time.perf_counter() - t
                steps = list(llm.engine.decode_steps)
                rows.append({"replicate": rep, "tok_s": args.requests * args.max_tokens / dt,
                             "step_ms": 1e3 * statistics.median(steps), "steps": steps,
                             "unacknowledged_steps": len(llm.engine.replication.pending)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "steps"}), flush=True)
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
    ap.add_argument("--every", type=int, default=1, help="steps per replication gather and send (default 1)")
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
    out = {"runs": rows, "ratios": ratios}
    print(f"tokens/s on / off: {', '.join(f'{x:.3f}' for x in ratios)} (mean {sum(ratios) / len(ratios):.3f})")
    if not args.fresh:
        step_on = [x for r in rows if r["replicate"] for x in r["steps"]]
        step_off = [x for r in rows if not r["replicate"] for x in r["steps"]]
        step_ratios = [b["step_ms"] / a["step_ms"] for a, b in zip(rows[0::2], rows[1::2])]
        med_on, med_off = statistics.median(step_on), statistics.median(step_off)
        out.update(step_ratios=step_ratios, step_ms_on=1e3 * med_on, step_ms_off=1e3 * med_off)
        print(f"median decode step on / off: {', '.join(f'{x:.3f}' for x in step_ratios)}; over all runs "
              f"{1e3 * med_on:.3f} / {1e3 * med_off:.3f} ms = {med_on / med_off:.3f} "
              f"({len(step_on)} / {len(step_off)} steps)")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
