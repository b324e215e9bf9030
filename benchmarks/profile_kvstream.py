"""Where a DéjàVuLib gather spends its time on CUDA: descriptor build, launch, kernel, wait.

    python benchmarks/profile_kvstream.py            (needs a GPU)
Prints one line per case; medians of 20 runs after warm-up.
"""
import random
import statistics
import time

import torch

from dejavu import _C
from dejavu.engine.kv_cache import PagedKVCache
from dejavu.kvstream import KVStreamer, Region


def med(xs):
    return statistics.median(xs) * 1e6


def profile(name, cache, region, mode):
    s = KVStreamer(cache, level=3, cuda_mode=mode, pool_bytes=64 << 20)
    nbytes = region.nbytes(s.layout)
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    contig = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t_desc, t_launch, t_total, t_kernel, t_base = [], [], [], [], []
    host, rows = s.descriptors(region)
    desc = host[:rows].cuda()
    for i in range(25):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s.descriptors(region)
        t1 = time.perf_counter()
        f = s.gather(region, buf)
        t2 = time.perf_counter()
        f.wait()
        t3 = time.perf_counter()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        _C.cuda_copy_spans(s.flat.data_ptr(), buf.data_ptr(), desc.data_ptr(), rows,
                           torch.cuda.current_stream().cuda_stream)
        e1.record()
        e1.synchronize()
        b0, b1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b0.record()
        buf.copy_(contig, non_blocking=True)
        b1.record()
        b1.synchronize()
        if i >= 5:
            t_desc.append(t1 - t0)
            t_launch.append(t2 - t1)
            t_total.append(t3 - t1)
            t_kernel.append(e0.elapsed_time(e1) / 1e3)
            t_base.append(b0.elapsed_time(b1) / 1e3)
    print(f"{name:<28} {mode:<7} bytes={nbytes:>10} rows={rows:>5} desc={med(t_desc):8.1f}us "
          f"launch={med(t_launch):8.1f}us total={med(t_total):8.1f}us kernel={med(t_kernel):8.1f}us "
          f"contig-dma={med(t_base):8.1f}us kernel/dma={med(t_base) / med(t_kernel):.2f}")


def main():
    rng = random.Random(0)
    c16 = PagedKVCache(24, 170, 16, 32, 64, torch.float16, torch.device("cuda"))
    c16.tensor.normal_()
    blocks = rng.sample(range(170), 85)
    for mode in ("direct", "staged"):
        profile("chunks bs16 (255 MiB)", c16, Region.chunks(range(24), blocks), mode)
        profile("newest token x32 x24 layers", c16, Region.tokens(range(24), blocks[:32], [rng.randrange(16) for _ in range(32)]), mode)


if __name__ == "__main__":
    main()
