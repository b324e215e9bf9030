"""`dejavu bench serve`: a load generator for an OpenAI-compatible server (ours, vLLM or another)
that reports what vLLM's `vllm bench serve` reports, under the same names.

Requests arrive as a Poisson process at --rate per second (gamma with --burstiness; inf: all at
once), at most --max-concurrency in flight, each a streamed /v1/completions call (token ids or
text) or /v1/chat/completions call (--backend openai-chat). The workload comes from serve_data
(random, prefix, sharegpt, synthetic, trace); the metrics from serve_metrics (TTFT, TPOT, ITL,
E2EL, throughputs, goodput); next to them our own normalized latency (request latency / output
tokens) and the nearest-rank p50/p95/p99 of every latency in seconds. --kill-worker runs the
failover benchmark instead (serve_failover), --chaos the chaos benchmark (serve_chaos).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.error
import urllib.request
from datetime import datetime

from . import write_json
from .serve_client import Progress, Target, peak_concurrency, run_load
from .serve_data import (Request, client_tokenizer, from_lengths, load_trace, random_requests,  # noqa: F401
                         sharegpt_requests, synthetic_lengths)
from .serve_failover import find_worker, format_failover, run_failover  # noqa: F401
from .serve_metrics import (format_summary, parse_goodput, parse_metric_percentiles,
                            parse_percentile_metrics, summarize)

DEFAULT_METRICS = "ttft,tpot,itl,e2el"
DEFAULT_PERCENTILES = "95,99"
DEFAULT_REQUESTS = 32  # a CPU server answers 32 of the default random requests in about a minute


def percentiles(xs: list[float]) -> dict:
    """Nearest-rank p50/p95/p99 and the mean (None each for no samples)."""
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
    return {"p50": q(50), "p95": q(95), "p99": q(99), "mean": sum(s) / len(s)}


def _base_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def server_info(url: str, api_key: str | None = None) -> dict:
    """The served model id and context length from /v1/models ({} where the server has none);
    a server that cannot be reached is an error before any load."""
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read()).get("data") or [{}]
    except urllib.error.HTTPError:
        return {}
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"cannot reach the server at {url}: {getattr(e, 'reason', e)}") from None
    except ValueError:
        return {}
    return {"model": data[0].get("id"), "max_model_len": data[0].get("max_model_len")}


def run(url: str, requests: list[Request] | list[tuple[int, int]], rate: float, model: str | None = None,
        seed: int = 0, api_key: str | None = None, json_path: str | None = None, progress: bool = True, *,
        backend: str = "openai", endpoint: str | None = None, max_concurrency: int | None = None,
        burstiness: float = 1.0, goodput: dict[str, float] | None = None, percentile_metrics: str = DEFAULT_METRICS,
        metric_percentiles: str = DEFAULT_PERCENTILES, ignore_eos: bool = True, tokenizer=None,
        save_path: str | None = None, meta: dict | None = None) -> dict:
    """Runs the load, prints the report, writes it to json_path and save_path; returns it.
    `requests` may be (prompt_tokens, output_tokens) pairs: random token ids (words for chat)."""
    metrics, pcts = parse_percentile_metrics(percentile_metrics), parse_metric_percentiles(metric_percentiles)
    if not requests:
        raise ValueError("no requests to send (an empty trace or dataset)")
    t = Target(_base_url(url), backend, endpoint, model, api_key, ignore_eos, tokenizer)
    if not isinstance(requests[0], Request):
        requests = from_lengths(requests, seed, text=t.chat)
    bar = Progress(len(requests), progress)
    records, duration = asyncio.run(run_load(t, requests, rate, seed, burstiness, max_concurrency, bar))
    ok = [r for r in records if r.get("ok")]
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": backend, "model_id": model,
        "tokenizer_id": None, "num_prompts": len(requests),
        "request_rate": rate if rate != float("inf") else "inf", "burstiness": burstiness,
        "max_concurrency": max_concurrency, "goodput_slos_ms": goodput or None, **(meta or {}),
        **summarize(records, duration, metrics, pcts, goodput or {}),
        # Our own names (scripts and docs/BENCHMARKS.md read them).
        "url": t.url, "requests": len(records), "duration_s": duration, "rate": rate if rate != float("inf") else "inf",
        "throughput_requests_per_s": len(ok) / duration,
        "throughput_output_tokens_per_s": sum(r["output_tokens"] for r in ok) / duration,
        "total_prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "normalized_latency_s_per_token": percentiles([r["normalized"] for r in ok]),
        "latency_s": percentiles([r["latency"] for r in ok]),
        "peak_concurrency": peak_concurrency(records),
        "start_times": [r.get("t_start") for r in records], "end_times": [r.get("t_end") for r in records],
    }
    print(format_report(result, metrics, pcts))
    write_json(json_path, result)
    if save_path:
        os.makedirs(os.path.dirname(save_path) or ".", exist_ok=True)
        write_json(save_path, result)
    return result


def format_report(r: dict, metrics: list[str], pcts: list[float]) -> str:
    nl = r["normalized_latency_s_per_token"]
    lines = [format_summary(r, metrics, pcts), " Normalized latency (latency / output tokens) ".center(50, "-")]
    if nl["p50"] is None:
        lines.append(f"{'Normalized latency (ms/token):':<40} n/a")
    else:
        lines += [f"{f'{label} normalized latency (ms/tok):':<40} {nl[k] * 1000:.2f}"
                  for k, label in (("mean", "Mean"), ("p50", "Median"), ("p95", "P95"), ("p99", "P99"))]
    lines.append("=" * 50)
    errors = sorted({e for e in r["errors"] if e})
    if errors:
        lines.append(f"failures: {r['failed']} ({'; '.join(errors[:5])})")
    return "\n".join(lines)


def _requests(args, dataset: str, info: dict, tokenizer, text: bool) -> list[Request]:
    n, seed = args.num_requests or DEFAULT_REQUESTS, args.seed
    if dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file)")
        ctx = info.get("max_model_len")
        return sharegpt_requests(args.dataset_path, n, seed, tokenizer, args.max_prompt,
                                 min(2048, ctx) if isinstance(ctx, int) else 2048, args.sharegpt_output_len)
    if dataset in ("random", "prefix"):
        prefix = args.prefix_len if args.prefix_len is not None else (256 if dataset == "prefix" else 0)
        if dataset == "prefix" and prefix <= 0:
            raise ValueError(f"--dataset-name prefix needs --prefix-len > 0, got {prefix}")
        return random_requests(n, seed, args.random_input_len, args.random_output_len, args.random_range_ratio,
                               prefix, text, args.prefix_fraction)
    if dataset == "trace":
        path = args.trace or args.dataset_path
        if not path:
            raise ValueError("--dataset-name trace needs --dataset-path FILE (a JSON list of [prompt, output] tokens)")
        return from_lengths(load_trace(path)[:args.num_requests], seed, text)
    return from_lengths(synthetic_lengths(n, seed, args.max_prompt, args.max_output), seed, text)


def main(args) -> int:
    """`dejavu bench serve` from its parsed arguments (cli/bench_serve.py)."""
    if not args.rate > 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    goodput = parse_goodput(args.goodput)
    parse_percentile_metrics(args.percentile_metrics), parse_metric_percentiles(args.metric_percentiles)
    dataset = "trace" if args.trace else "synthetic" if args.synthetic else args.dataset_name or "random"
    url = _base_url(args.url)
    info = server_info(url, args.api_key)
    model = args.model or info.get("model")
    tokenizer, spec = None, None
    if args.tokenizer or dataset == "sharegpt":
        spec = args.tokenizer or model
        if not spec:
            raise ValueError("the server names no model at /v1/models: pass --tokenizer (a model spec) for sharegpt")
        tokenizer = client_tokenizer(spec)
    text = args.backend == "openai-chat" or args.text_prompts
    requests = _requests(args, dataset, info, tokenizer, text)
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else dataset != "sharegpt"
    t_kw = dict(backend=args.backend, endpoint=args.endpoint, ignore_eos=ignore_eos, tokenizer=tokenizer)
    if getattr(args, "chaos", None) is not None:
        from .serve_chaos import chaos_ok, format_chaos, parse_faults, run_chaos
        t = Target(url, model=model, api_key=args.api_key, **t_kw)
        r = run_chaos(t, requests, args.rate, args.chaos, args.chaos_interval, parse_faults(args.chaos_faults),
                      args.seed, args.burstiness, args.max_concurrency)
        print(format_chaos(r))
        write_json(args.json, r)
        return 0 if chaos_ok(r) else 1
    if args.kill_worker:
        t = Target(url, model=model, api_key=args.api_key, **t_kw)
        r = run_failover(t, requests, args.rate, args.kill_worker, args.kill_at, args.seed, args.burstiness,
                         args.max_concurrency)
        print(format_failover(r))
        write_json(args.json, r)
        return 0 if r["failure"]["completed"] == r["failure"]["requests"] else 1
    save_path = None
    if args.save_result:
        conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        base = re.sub(r"[^A-Za-z0-9._-]", "-", (model or "model").rstrip("/").split("/")[-1])
        name = args.result_filename or (f"{args.backend}-{args.rate}qps{conc}-{base}-"
                                        f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
        save_path = os.path.join(args.result_dir or ".", name)
    r = run(url, requests, args.rate, model, args.seed, args.api_key, args.json, not args.disable_tqdm,
            max_concurrency=args.max_concurrency, burstiness=args.burstiness, goodput=goodput,
            percentile_metrics=args.percentile_metrics, metric_percentiles=args.metric_percentiles,
            save_path=save_path, meta={"dataset_name": dataset, "tokenizer_id": spec}, **t_kw)
    return 0 if r["completed"] else 1
