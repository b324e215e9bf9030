"""kernels.linear_chain (several linear layers in one persistent kernel, grid barriers between
them) against the same layers as kernels of their own, in one run, at one input row.

- "mlp": OPT's out_proj -> add + LayerNorm + fc1 (ReLU) -> fc2 for `--layers` decoder layers, each
  with its own weights (more than the L2 cache holds), as one graph: the chain (one kernel a layer)
  against linear, add_norm_linear, linear (three a layer).
- "barrier": chains of 1, 2 and 4 layers of 64 x 64 (next to nothing to read) per launch, so the
  difference is the cost of the grid barriers: microseconds per barrier.

  python3 benchmarks/chain_bench.py [--hidden 2048] [--ffn 8192] [--layers 24] [--dtype float16]
DEJAVU_CHAIN_SPIN=N (N > 0) makes the barrier poll with a release-add and N ns sleeps.
"""
from __future__ import annotations

import argparse

import torch

from dejavu import kernels
from linear_bench import gpu_us  # (benchmarks/ is on the path when this runs as a script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    a = ap.parse_args()
    dt, dev = getattr(torch, a.dtype), "cuda"
    kernels.LINEAR_CHAIN = True
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * scale

    h, o = rnd(1, a.hidden), rnd(1, a.hidden)
    blocks = []
    for _ in range(a.layers):
        norm = torch.nn.LayerNorm(a.hidden, device=dev, dtype=dt)
        blocks.append(dict(wo=rnd(a.hidden, a.hidden, scale=a.hidden ** -0.5), bo=rnd(a.hidden), norm=norm,
                           w1=rnd(a.ffn, a.hidden, scale=a.hidden ** -0.5), b1=rnd(a.ffn),
                           w2=rnd(a.hidden, a.ffn, scale=a.ffn ** -0.5), b2=rnd(a.hidden)))

    def chain():
        for b in blocks:
            out = kernels.linear_chain(o, [kernels.ChainLayer(b["wo"], b["bo"]),
                                           kernels.ChainLayer(b["w1"], b["b1"], relu=True, norm=b["norm"], h=h),
                                           kernels.ChainLayer(b["w2"], b["b2"])])
            assert out is not None

    def apart():
        for b in blocks:
            x = kernels.linear(o, b["wo"], b["bo"])
            _, f = kernels.add_norm_linear(h, x, b["norm"], b["w1"], b["b1"], relu=True)
            kernels.linear(f, b["w2"], b["b2"])

    with torch.inference_mode():
        gb = sum(sum(t.numel() for k, t in b.items() if k != "norm") for b in blocks) * torch.finfo(dt).bits / 8 / 1e9
        torch.cuda.synchronize()
        t_apart, t_chain = gpu_us(apart, reps=1), gpu_us(chain, reps=1)
        print(f"{torch.cuda.get_device_name()}, {a.dtype}: {a.layers} MLP blocks ({a.hidden} -> {a.ffn}), "
              f"{gb:.2f} GB of weights")
        print(f"  three kernels a block: {t_apart:8.1f} us ({gb / t_apart * 1e6:.0f} GB/s)")
        print(f"  one chain a block:     {t_chain:8.1f} us ({gb / t_chain * 1e6:.0f} GB/s)  "
              f"chain / apart {t_chain / t_apart:.3f}")
        x = rnd(1, 64)
        ws = [rnd(64, 64, scale=0.125) for _ in range(4)]
        per = {}
        for n in (1, 2, 4):
            layers = [kernels.ChainLayer(w) for w in ws[:n]]
            torch.cuda.synchronize()
            per[n] = gpu_us(lambda: kernels.linear_chain(x, layers), reps=50)
        print(f"  barrier: a chain of 1, 2, 4 tiny layers takes {per[1]:.2f}, {per[2]:.2f}, {per[4]:.2f} us a "
              f"launch: {(per[4] - per[1]) / 3:.2f} us per layer after the first")


if __name__ == "__main__":
    main()
