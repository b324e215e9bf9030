"""`dejavu bench serve`: the load generator for an OpenAI-compatible server."""
from __future__ import annotations

import argparse
import os

from .common import positive


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="load generator for an OpenAI-compatible server (vLLM's serving metrics)",
                        description="Streams requests to an OpenAI-compatible server and reports vLLM's serving "
                                    "benchmark metrics (TTFT, TPOT, ITL, E2EL, throughput, goodput) and ours "
                                    "(normalized latency). See docs/serving.md, Benchmarking.")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset-name", choices=["random", "prefix", "sharegpt", "synthetic", "trace"], default=None,
                     help="workload (default random): random lengths, a shared prefix + random suffixes (prefix), "
                          "a ShareGPT JSON file (sharegpt, --dataset-path), chat-like long-tailed lengths "
                          "(synthetic) or a trace file (trace, --dataset-path)")
    src.add_argument("--trace", help="JSON list of [prompt_tokens, output_tokens] (= --dataset-name trace)")
    src.add_argument("--synthetic", action="store_true", help="chat-like long-tailed lengths (= --dataset-name "
                     "synthetic)")
    p.add_argument("--dataset-path", default=None, help="the sharegpt or trace file")
    p.add_argument("--backend", default="openai", choices=["openai", "vllm", "openai-chat"],
                   help="openai / vllm: /v1/completions; openai-chat: /v1/chat/completions with text messages")
    p.add_argument("--endpoint", default=None, help="API path (default: by --backend)")
    p.add_argument("--rate", "--request-rate", dest="rate", type=float, default=float("inf"),
                   help="requests per second (Poisson); inf = all at once (default)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="arrival gaps are gamma distributed with this shape (1: Poisson; < 1 burstier)")
    p.add_argument("--max-concurrency", type=positive("--max-concurrency"), default=None,
                   help="at most this many requests in flight (later arrivals wait for a slot)")
    p.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=positive("--num-requests"),
                   default=None, help="requests to send (default: 32, a CPU server's minute or so; a trace: all)")
    p.add_argument("--random-input-len", type=positive("--random-input-len"), default=256,
                   help="random / prefix: prompt tokens after the prefix (default 256)")
    p.add_argument("--random-output-len", type=positive("--random-output-len"), default=64,
                   help="random / prefix: output tokens (default 64)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random / prefix: lengths uniform in [L*(1-r), L*(1+r)], r in [0, 1) (default 0)")
    p.add_argument("--prefix-len", "--random-prefix-len", dest="prefix_len", type=int, default=None,
                   help="tokens of one prefix shared by every request (default: 256 for prefix, 0 for random)")
    p.add_argument("--prefix-fraction", type=float, default=1.0,
                   help="prefix: the fraction of requests in [0, 1] that start with the shared prefix; the rest "
                        "start with as many random tokens (default 1)")
    p.add_argument("--sharegpt-output-len", type=positive("--sharegpt-output-len"), default=None,
                   help="sharegpt: this output length instead of the gpt turn's")
    p.add_argument("--max-prompt", type=positive("--max-prompt"), default=1024,
                   help="synthetic: longest prompt; sharegpt: longest prompt kept (default 1024)")
    p.add_argument("--max-output", type=positive("--max-output"), default=512, help="synthetic: longest output")
    p.add_argument("--text-prompts", action="store_true",
                   help="completions: send token-count workloads as text (words) instead of token ids")
    p.add_argument("--tokenizer", default=None,
                   help="model spec whose tokenizer counts sharegpt text (default: the server's model id)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="send ignore_eos so outputs run to max_tokens (default: on, except for sharegpt; "
                        "ours and vLLM accept it, other servers may not)")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (milliseconds)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="metrics to report (default ttft,tpot,itl,e2el)")
    p.add_argument("--metric-percentiles", default="95,99", help="percentiles to report (default 95,99)")
    p.add_argument("--model", default=None, help="model id to send (default: the server's, from /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("DEJAVU_API_KEY"), help="default: $DEJAVU_API_KEY")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar (it shows only on a terminal)")
    p.add_argument("--json", default=None, help="write the report, per-request arrays included, to this file")
    p.add_argument("--save-result", action="store_true",
                   help="also write it as vLLM names it: --result-dir / --result-filename (default "
                        "BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--kill-worker", default=None, metavar="ROLE:STAGE",
                   help="failover benchmark: kill -9 this worker (stage:N, token:N or prompt:N, from /v1/cluster; "
                        "same host) during a second pass of the same load, after a failure-free first pass")
    p.add_argument("--kill-at", type=float, default=2.0, help="seconds into the pass to kill the worker")
    from ..bench.serve_chaos import add_chaos_args
    add_chaos_args(p)
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args) -> int:
    from ..bench.serve import main

    return main(args)
