"""Prometheus metrics in the text exposition format (no client library needed).

Two sets: our own (`dejavu_*`: transfers, recoveries, KV blocks) and vLLM's set under a `dejavu:`
prefix with a `model_name` label (`dejavu:num_requests_running`, `dejavu:time_to_first_token_seconds`,
...: vLLM's `vllm:` names and meanings), so dashboards written for vLLM work with the prefix renamed.
"""
from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.n += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        out, cum, sep = [], 0, "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {cum}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {self.sum}")
        out.append(f"{name}_count{lab} {self.n}")
        return out


def label_value(v: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# vLLM's metrics: (name, type, help, source). Sources: a key of Metrics.counters or .gauges, a histogram
# attribute, or "finished" (requests by finish reason).
VLLM = (("num_requests_running", "gauge", "Requests in model execution batches.", "dejavu_running_requests"),
        ("num_requests_waiting", "gauge", "Requests waiting to be processed.", "dejavu_queue_depth"),
        ("kv_cache_usage_perc", "gauge", "KV-cache usage: 1 means 100 percent.", "kv_usage"),
        ("num_preemptions_total", "counter", "Cumulative number of preemptions.", "preemptions"),
        ("prompt_tokens_total", "counter", "Prefill tokens processed.", "dejavu_prompt_tokens_total"),
        ("generation_tokens_total", "counter", "Generation tokens processed.", "dejavu_generation_tokens_total"),
        ("request_success_total", "counter", "Successfully processed requests, by finish reason.", "finished"),
        ("time_to_first_token_seconds", "histogram", "Time to first token in seconds.", "ttft"),
        ("inter_token_latency_seconds", "histogram", "Time between output tokens in seconds.", "itl"),
        ("e2e_request_latency_seconds", "histogram", "End-to-end request latency in seconds.", "e2e"))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters = {"dejavu_requests_total": 0, "dejavu_requests_failed_total": 0,
                         "dejavu_requests_cancelled_total": 0, "dejavu_prompt_tokens_total": 0,
                         "dejavu_generation_tokens_total": 0, "dejavu_recoveries_total": 0}
        # Values or callables (read at render time from the engine's own counters).
        self.bytes_streamed = {"prompt_to_token": 0, "swap_out": 0, "swap_in": 0, "replication": 0}
        self.transfer_seconds = {"prompt_to_token_compute": 0.0, "prompt_to_token_exposed": 0.0,
                                 "prompt_to_token_raw": 0.0}
        self.prefix_hit_tokens: dict = {}  # tier -> prompt tokens served from the prefix cache (callables)
        self.prefix_tiers = None  # () -> {tier: {"blocks", "capacity_blocks"}} (LLMEngine.prefix_cache_tiers)
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.gauges = {"dejavu_queue_depth": lambda: 0, "dejavu_running_requests": lambda: 0,
                       "dejavu_kv_blocks_used": lambda: 0, "dejavu_kv_blocks_total": lambda: 0}
        self.model_name = "dejavu"  # the model_name label of the vLLM-named set
        self.preemptions = lambda: 0
        self.finished = {"stop": 0, "length": 0, "abort": 0}

    def inc(self, name: str, v: int = 1) -> None:
        with self._lock:
            self.counters[name] += v

    def finish(self, reason: str) -> None:
        if reason in self.finished:
            with self._lock:
                self.finished[reason] += 1

    def observe(self, hist: str, v: float) -> None:
        with self._lock:
            getattr(self, hist).observe(v)

    def render(self) -> str:
        with self._lock:
            lines = []
            for k, v in self.counters.items():
                lines += [f"# TYPE {k} counter", f"{k} {v() if callable(v) else v}"]
            lines.append("# TYPE dejavu_kv_bytes_streamed_total counter")
            for kind, v in self.bytes_streamed.items():
                lines.append(f'dejavu_kv_bytes_streamed_total{{kind="{kind}"}} {v() if callable(v) else v}')
            lines.append("# TYPE dejavu_kv_transfer_seconds_total counter")
            for part, v in self.transfer_seconds.items():
                lines.append(f'dejavu_kv_transfer_seconds_total{{part="{part}"}} {v() if callable(v) else v}')
            if self.prefix_hit_tokens:
                lines.append("# TYPE dejavu_prefix_cache_hit_tokens_total counter")
                for tier, v in self.prefix_hit_tokens.items():
                    lines.append(f'dejavu_prefix_cache_hit_tokens_total{{tier="{tier}"}} {v()}')
            if self.prefix_tiers is not None:
                tiers = self.prefix_tiers()
                for key, name in (("blocks", "dejavu_prefix_cache_blocks"),
                                  ("capacity_blocks", "dejavu_prefix_cache_capacity_blocks")):
                    lines.append(f"# TYPE {name} gauge")
                    lines += [f'{name}{{tier="{t}"}} {v[key]}' for t, v in tiers.items()]
            for k, fn in self.gauges.items():
                lines += [f"# TYPE {k} gauge", f"{k} {fn()}"]
            for name, h in (("dejavu_time_to_first_token_seconds", self.ttft),
                            ("dejavu_inter_token_latency_seconds", self.itl),
                            ("dejavu_request_latency_seconds", self.e2e)):
                lines.append(f"# TYPE {name} histogram")
                lines += h.render(name)
            lines += self._render_vllm()
        return "\n".join(lines) + "\n"

    def _render_vllm(self) -> list[str]:
        label = f'model_name="{label_value(self.model_name)}"'
        used, total = self.gauges["dejavu_kv_blocks_used"](), self.gauges["dejavu_kv_blocks_total"]()
        lines = []
        for short, kind, help_, src in VLLM:
            name = "dejavu:" + short
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                lines += getattr(self, src).render(name, label)
            elif src == "finished":
                lines += [f'{name}{{{label},finished_reason="{r}"}} {n}' for r, n in self.finished.items()]
            else:
                v = (used / total if total else 0.0) if src == "kv_usage" else self.preemptions() \
                    if src == "preemptions" else self.counters.get(src, self.gauges.get(src))
                lines.append(f"{name}{{{label}}} {v() if callable(v) else v}")
        return lines
