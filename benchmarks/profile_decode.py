"""Where one decode step's GPU time goes: kernel time by kernel name, from torch.profiler.

    python benchmarks/profile_decode.py [--model random:opt-1.3b] [--batch 1] [--ctx 576] [--graphs]   (needs a GPU)
Runs decode steps after a prefill of --ctx tokens per sequence, and prints the kernels grouped by
name, with their share. By default the steps run eagerly: each kernel's own duration, as if alone.
With --graphs they replay the engine's CUDA graphs, where kernels overlap under programmatic
launch; each kernel is then also charged its critical-path share: how far its end lies past the
latest end of the kernels that started before it (these shares add up to the time the GPU was
busy, so they say which kernels the step actually waits for).
"""
import argparse
from collections import defaultdict

import torch

from dejavu import LLM, SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:opt-1.3b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=576)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--graphs", action="store_true", help="replay the CUDA graphs (kernels overlap)")
    a = ap.parse_args()
    llm = LLM(model=a.model, device="cuda", dtype=a.dtype, max_num_seqs=a.batch, cuda_graphs=a.graphs,
              kv_cache_blocks=a.batch * (-(-(a.ctx + a.steps + 8) // 16)) + 1)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=a.steps + 4, ignore_eos=True)
    for _ in range(a.batch):
        eng.add_request(torch.randint(10, 1000, (a.ctx,), generator=g).tolist(), params)
    eng.step()  # prefill
    eng.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            eng.step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per = defaultdict(lambda: [0.0, 0, 0.0])  # name -> [own us, launches, critical-path us]
    latest = float("-inf")
    for e in kernels:
        per[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        per[e.name][1] += 1
        per[e.name][2] += max(0.0, e.time_range.end - max(latest, e.time_range.start))
        latest = max(latest, e.time_range.end)
    total = sum(v[0] for v in per.values())
    busy = sum(v[2] for v in per.values())
    mode = "graph replays" if a.graphs else "eager"
    print(f"{torch.cuda.get_device_name()}, {a.model} {a.dtype}, batch {a.batch}, context {a.ctx}, {mode}: "
          f"{total / a.steps / 1e3:.3f} ms of kernels per step, GPU busy {busy / a.steps / 1e3:.3f} ms, "
          f"{sum(v[1] for v in per.values()) // a.steps} kernels")
    print(f"{'share':>6} {'us/step':>8} {'critical':>8} {'calls':>5}  kernel (share: of the kernels' own time; "
          "critical: past the ends of the kernels before it)")
    for name, (us, n, crit) in sorted(per.items(), key=lambda kv: -kv[1][2 if a.graphs else 0])[:18]:
        print(f"{100 * us / total:5.1f}% {us / a.steps:8.1f} {crit / a.steps:8.1f} {n // a.steps:5d}  {name[:90]}")

if __name__ == "__main__":
    main()
