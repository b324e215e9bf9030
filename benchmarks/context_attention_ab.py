"""Attention of a prefill over a cached context (prefix-cache hits, a recovery's recomputation):
the decode kernel with one query row per new token, against SDPA looped over the sequences
(models/layers.py paged_attention), alternating in one process, one layer of OPT-1.3B's shape.

    python benchmarks/context_attention_ab.py [--batch 1,8,32] [--context 512,1024] [--new 2,16,32,64,256] [--runs 20]

Shapes above kernels.CONTEXT_ROWS_MAX_TOKENS new tokens are measured too (the rows are built here
whatever the engine would pick).

Prints, per shape, the median milliseconds of each over --runs alternating runs (after one untimed
run of each; the metadata is built once per step, outside the timing, as the engine shares it
across layers) and the largest difference between their outputs. CUDA only.
"""
import argparse
import dataclasses
import time

import torch

from dejavu import kernels
from dejavu.engine.model_runner import build_metadata
from dejavu.models.layers import paged_attention


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=ints, default=ints("1,8,32"))
    ap.add_argument("--context", type=ints, default=ints("512,1024"), help="tokens cached before the new ones")
    ap.add_argument("--new", type=ints, default=ints("2,16,32,64,256"), help="new tokens per sequence")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    kernels.CONTEXT_ROWS_MAX_TOKENS = max(a.new)  # build the rows for every shape measured
    dev, dt = torch.device("cuda"), torch.float16
    torch.manual_seed(0)
    h, d, bs = a.heads, a.head_dim, a.block_size
    print(f"{torch.cuda.get_device_name(dev)}, float16, {h} heads x {d}, block {bs}: attention ms of one layer, "
          f"median of {a.runs} alternating runs; rows = the decode kernel, a query row per new token; "
          f"loop = SDPA per sequence")
    print(f"{'batch':>5} {'context':>7} {'new':>4} {'rows ms':>8} {'loop ms':>8} {'loop/rows':>9} {'max diff':>9}")
    for b in a.batch:
        for ctx in a.context:
            for new in a.new:
                per_seq = -(-(ctx + new) // bs)
                cache = torch.randn(b * per_seq, 2, bs, h, d, device=dev, dtype=dt)
                items = [([1] * new, ctx, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(b)]
                _, _, meta, _ = build_metadata(items, bs, dev)
                loop = dataclasses.replace(meta, row_tables=None, row_context=None)
                q, k, v = (torch.randn(b * new, h, d, device=dev, dtype=dt) for _ in range(3))
                outs, times = {}, {"rows": [], "loop": []}
                for i in range(a.runs + 1):
                    for name, m in (("rows", meta), ("loop", loop)):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        outs[name] = paged_attention(q, k, v, cache, m, d ** -0.5)
                        torch.cuda.synchronize()
                        if i:
                            times[name].append(time.perf_counter() - t0)
                med = {n: 1e3 * sorted(x)[len(x) // 2] for n, x in times.items()}
                diff = (outs["rows"].float() - outs["loop"].float()).abs().max().item()
                print(f"{b:>5} {ctx:>7} {new:>4} {med['rows']:>8.3f} {med['loop']:>8.3f} "
                      f"{med['loop'] / med['rows']:>8.2f}x {diff:>9.2e}")


if __name__ == "__main__":
    main()
