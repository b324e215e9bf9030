"""Prometheus metrics in the text exposition format (no client library needed)."""
from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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

    def render(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{b}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.sum}")
        out.append(f"{name}_count {self.n}")
        return out


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

    def inc(self, name: str, v: int = 1) -> None:
        with self._lock:
            self.counters[name] += v

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
        return "\n".join(lines) + "\n"
