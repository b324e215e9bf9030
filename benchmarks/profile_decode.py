"""Where one decode step's GPU time goes: kernel time by kernel name, from torch.profiler.

    python benchmarks/profile_decode.py [--model random:opt-1.3b] [--batch 1] [--ctx 576]   (needs a GPU)
Runs decode steps eagerly (kernel durations do not depend on how they were launched) after a
prefill of --ctx tokens per sequence, and prints the kernels grouped by name, with their share.
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
    a = ap.parse_args()
    llm = LLM(model=a.model, device="cuda", dtype=a.dtype, max_num_seqs=a.batch, cuda_graphs=False,
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
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            per[e.name][1] += 1
    total = sum(v[0] for v in per.values())
    print(f"{torch.cuda.get_device_name()}, {a.model} {a.dtype}, batch {a.batch}, context {a.ctx}: "
          f"{total / a.steps / 1e3:.3f} ms of kernels per step, {sum(v[1] for v in per.values()) // a.steps} kernels")
    for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"{100 * us / total:5.1f}%  {us / a.steps:8.1f} us/step  {n // a.steps:4d}/step  {name[:90]}")


if __name__ == "__main__":
    main()
