"""The serving metrics `dejavu bench serve` reports under vLLM's names (`vllm bench serve`), so runs
of the two compare key by key.

Per successful request: TTFT, TPOT = (latency - TTFT) / (output tokens - 1) (only requests with
more than one output token), ITL (every gap between output chunks, all requests pooled) and E2EL
(the request's latency). Each selected metric gets mean, median, std and the chosen percentiles
(linear interpolation between samples, as numpy's default), in ms: `mean_ttft_ms`,
`median_tpot_ms`, `p99_itl_ms`, ... Goodput is the requests per second that meet every given SLO
(a request with one output token counts TPOT 0).
"""
from __future__ import annotations

import math

METRICS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--goodput takes NAME:MILLISECONDS pairs, got {item!r}")
        if name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput: unknown metric {name!r} in {item!r}; use {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r} needs a number of milliseconds after the colon") from None
        if not ms >= 0 or math.isinf(ms):
            raise ValueError(f"--goodput: the SLO in {item!r} must be a finite number >= 0")
        out[name] = ms
    return out


def parse_percentile_metrics(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in METRICS]
    if bad or not names:
        raise ValueError(f"--percentile-metrics takes a comma-separated list of {', '.join(METRICS)}, got {text!r}")
    return names


def parse_metric_percentiles(text: str) -> list[float]:
    try:
        ps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ps = []
    if not ps or not all(0 < p <= 100 for p in ps):
        raise ValueError(f"--metric-percentiles takes comma-separated numbers in (0, 100], got {text!r}")
    return ps


def percentile(sorted_xs: list[float], p: float) -> float:
    """Linear interpolation between the two nearest ranks."""
    k = p / 100 * (len(sorted_xs) - 1)
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _stats(name: str, xs: list[float], pcts: list[float]) -> dict:
    if not xs:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"std_{name}_ms": None,
                **{f"p{_pword(p)}_{name}_ms": None for p in pcts}}
    s = sorted(xs)
    mean = sum(s) / len(s)
    return {f"mean_{name}_ms": mean * 1000, f"median_{name}_ms": percentile(s, 50) * 1000,
            f"std_{name}_ms": math.sqrt(sum((x - mean) ** 2 for x in s) / len(s)) * 1000,
            **{f"p{_pword(p)}_{name}_ms": percentile(s, p) * 1000 for p in pcts}}


def summarize(records: list[dict], duration: float, metrics: list[str], pcts: list[float],
              goodput: dict[str, float]) -> dict:
    """vLLM's summary and per-request arrays (seconds in the arrays, ms in the statistics)."""
    ok = [r for r in records if r.get("ok")]
    tpot_of = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) if r["output_tokens"] > 1 else 0.0 for r in ok]
    samples = {"ttft": [r["ttft"] for r in ok],
               "tpot": [t for r, t in zip(ok, tpot_of) if r["output_tokens"] > 1],
               "itl": [x for r in ok for x in r["itl"]],
               "e2el": [r["latency"] for r in ok]}
    good = None
    if goodput:
        per = {"ttft": [r["ttft"] for r in ok], "tpot": tpot_of, "e2el": [r["latency"] for r in ok]}
        good = sum(all(per[m][i] * 1000 <= slo for m, slo in goodput.items()) for i in range(len(ok)))
    total_in = sum(r["prompt_tokens"] for r in ok)
    total_out = sum(r["output_tokens"] for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(records) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration,
           "request_goodput": None if good is None else good / duration,
           "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration}
    for m in metrics:
        out.update(_stats(m, samples[m], pcts))
    out.update(input_lens=[r.get("prompt_tokens", 0) for r in records],
               output_lens=[r["output_tokens"] if r.get("ok") else 0 for r in records],
               ttfts=[r["ttft"] if r.get("ok") else 0.0 for r in records],
               itls=[r["itl"] if r.get("ok") else [] for r in records],
               e2els=[r["latency"] if r.get("ok") else 0.0 for r in records],
               errors=[r.get("error", "") for r in records])
    return out


def format_summary(r: dict, metrics: list[str], pcts: list[float]) -> str:
    def line(label, value, fmt="{:.2f}"):
        return f"{label:<40} {'n/a' if value is None else fmt.format(value)}"
    lines = [" Serving Benchmark Result ".center(50, "="), line("Successful requests:", r["completed"], "{}")]
    if r["failed"]:
        lines.append(line("Failed requests:", r["failed"], "{}"))
    if r.get("max_concurrency"):
        lines.append(line("Maximum request concurrency:", r["max_concurrency"], "{}"))
    lines += [line("Benchmark duration (s):", r["duration"]), line("Total input tokens:", r["total_input_tokens"], "{}"),
              line("Total generated tokens:", r["total_output_tokens"], "{}"),
              line("Request throughput (req/s):", r["request_throughput"])]
    if r["request_goodput"] is not None:
        lines.append(line("Request goodput (req/s):", r["request_goodput"]))
    lines += [line("Output token throughput (tok/s):", r["output_throughput"]),
              line("Total Token throughput (tok/s):", r["total_token_throughput"])]
    for m in metrics:
        short, header = METRICS[m]
        lines += [f" {header} ".center(50, "-"), line(f"Mean {short} (ms):", r[f"mean_{m}_ms"]),
                  line(f"Median {short} (ms):", r[f"median_{m}_ms"])]
        lines += [line(f"P{_pword(p)} {short} (ms):", r[f"p{_pword(p)}_{m}_ms"]) for p in pcts]
    return "\n".join(lines)
