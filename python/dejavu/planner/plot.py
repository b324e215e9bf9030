"""`dejavu simulate --plot`: throughput and latency of the simulated deployments side by side."""
from __future__ import annotations

from .model import PlanError


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install 'dejavu-serve[plot]' (or matplotlib)") from None
    names = [r["deployment"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 3.6))
    a.bar(names, [r["tokens_per_s"] for r in results], color="#4c72b0")
    a.set_ylabel("tokens / s")
    a.set_title("throughput")
    x = range(len(names))
    w = 0.38
    b.bar([i - w / 2 for i in x], [r["latency_s"]["p50"] for r in results], w, label="p50", color="#55a868")
    b.bar([i + w / 2 for i in x], [r["latency_s"]["p99"] for r in results], w, label="p99", color="#c44e52")
    b.set_xticks(list(x), names)
    b.set_ylabel("request latency (s)")
    b.set_title("latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
