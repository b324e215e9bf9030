"""Decode-sized linear layers: our small_linear kernel against torch's F.linear (cuBLAS) on the
same inputs, in one run. GPU time from CUDA graphs of 20 back-to-back calls (no launch gaps);
GB/s counts the weight bytes read; "picked" is what kernels.linear uses for that shape.

  python3 benchmarks/linear_bench.py [--dtype float16] [--shapes 6144x2048,...] [--rows 1,2,4]
Default shapes: OPT-1.3B's fused q/k/v, out_proj, fc1, fc2 and LM head ([out, in]).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from dejavu import kernels
from dejavu.bench import write_json


def gpu_us(fn, reps: int = 20, trials: int = 10) -> float:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()  # warm-up (cuBLAS handles, workspaces)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shapes", default="6144x2048,2048x2048,8192x2048,2048x8192,50272x2048")
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name(0)}, {args.dtype}; us per call (GPU), weight GB/s")
    print(f"{'out x in':>12} {'rows':>4} {'cuBLAS us':>10} {'ours us':>8} {'cuBLAS GB/s':>12} {'ours GB/s':>10} {'speed-up':>8} {'picked':>7}")
    rows_out = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=dtype)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            os.environ["DEJAVU_LINEAR"] = "torch"
            t_ref = gpu_us(lambda: F.linear(x, w, b))
            os.environ["DEJAVU_LINEAR"] = "auto"
            # The kernel itself, also where kernels.linear would pick cuBLAS (the table behind that choice).
            t_ours = gpu_us(lambda: kernels.small_linear(x, w, b))
            err = ((kernels.small_linear(x, w, b).double() - F.linear(x, w, b).double()).norm()
                   / F.linear(x, w, b).double().norm()).item()
            gb = w.numel() * w.element_size() / 1e9
            picked = "ours" if kernels.small_linear_serves(x, w, b) else "cuBLAS"
            rows_out.append({"out": n, "in": k, "rows": m, "cublas_us": t_ref, "ours_us": t_ours, "rel_diff": err,
                             "linear_picks": picked})
            print(f"{shape:>12} {m:>4} {t_ref:>10.2f} {t_ours:>8.2f} {gb / t_ref * 1e6:>12.0f} {gb / t_ours * 1e6:>10.0f} "
                  f"{t_ref / t_ours:>7.2f}x {picked:>7}")
    write_json(args.json, rows_out)


if __name__ == "__main__":
    main()
