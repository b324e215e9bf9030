"""Where a request's TTFT goes with prefix caching, independent of the machine's load: a closed loop
of --concurrency clients driven straight on the engine (no HTTP), the `prefix` dataset of
prefix_cache_ab.py; per request, the tokens computed by the steps from its arrival to its first
token (prompt tokens of prefill steps, one per sequence of decode steps). Run with
DEJAVU_OVERLAP=0 so that every step() runs one step.

    DEJAVU_OVERLAP=0 python3 benchmarks/prefix_critical_path.py --caching on
"""
from __future__ import annotations

import argparse
import statistics

from dejavu import LLM, SamplingParams
from dejavu.bench.serve_data import random_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-tiny")
    ap.add_argument("--caching", choices=("on", "off"), default="on")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--prefix-fraction", type=float, default=0.9)
    args = ap.parse_args()
    reqs = random_requests(args.requests, 0, 64, 16, prefix_len=args.prefix_len, prefix_fraction=args.prefix_fraction)
    llm = LLM(model=args.model, device="cpu", block_size=16, kv_cache_blocks=1024, max_model_len=2048,
              enable_prefix_caching=args.caching == "on")
    eng = llm.engine
    computed = [0]
    run = eng.runner.run_with_rows

    def counted(seqs, is_prefill, *a, **k):
        computed[0] = sum(len(s) - s.num_cached for s in seqs) if is_prefill else len(seqs)
        return run(seqs, is_prefill, *a, **k)
    eng.runner.run_with_rows = counted
    todo, live, path = list(reqs), {}, []  # live: seq id -> [seq, tokens on its path so far, first token seen]
    while todo or live:
        while todo and len(live) < args.concurrency:
            r = todo.pop(0)
            s = eng.add_request(r.prompt, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
            live[s.seq_id] = [s, 0, False]
        computed[0] = 0
        eng.step()
        for sid, v in list(live.items()):
            s = v[0]
            if not v[2]:
                v[1] += computed[0]
                if s.num_output_tokens >= 1:
                    v[2] = True
                    path.append(v[1])
            if s.finished:
                del live[sid]
    st = eng.prefix_cache_stats() or {}
    print(f"caching {args.caching}: tokens computed between a request's arrival and its first token: p50 "
          f"{statistics.median(path):.0f}, p90 {sorted(path)[int(0.9 * len(path))]}; hit tokens {st.get('hit_tokens')}")


if __name__ == "__main__":
    main()
