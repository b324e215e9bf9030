"""`dejavu bench kvstream`: DéjàVuLib bandwidth per level, mode and block size, next to a
contiguous copy of the same bytes measured in the same run.

Cache shape by default: OPT-1.3B (24 layers, 32 KV heads of 64, fp16). With 16-token blocks one
(layer, block) chunk is 128 KiB (64 KiB of K and 64 KiB of V, adjacent). The region moved is all
layers x a random subset of blocks (scattered through the cache). Directions:
  d2h   cache -> pinned host (gather)           baseline: one contiguous device->pinned copy
  h2d   pinned host -> cache (scatter)          baseline: one contiguous pinned->device copy
  file  cache -> local file (stream_out)        baseline: contiguous copy to pinned + one file write
  token the newest token of 32 requests across all layers (d2h), the replication pattern
On CPU the cache is host memory and the baselines are single contiguous memcpys.
Times are medians of --repeat runs after a warm-up; wall time includes launch overheads.
"""
from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

import torch

from .. import _C
from ..engine.kv_cache import PagedKVCache
from ..kvstream import FileDest, KVStreamer, Region
from . import write_json


def _time(fn, repeat, sync, before=None):
    """Median of `repeat` timed calls after a warm-up; `before` runs ahead of each, untimed."""
    fn()
    sync()
    out = []
    for _ in range(repeat):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run(device: str, layers: int, heads: int, head_dim: int, block_sizes: list[int], levels: list[int],
        total_mib: int, repeat: int, file_dir: str | None, json_path: str | None) -> dict:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    dtype = torch.float16
    total = total_mib << 20
    modes = ["staged", "direct"] if cuda else ["cpu"]
    rows = []
    card = torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)"
    rng = random.Random(0)
    tmp = tempfile.mkdtemp(dir=file_dir)

    for bs in block_sizes:
        chunk = 2 * bs * heads * head_dim * 2
        nblk_moved = max(1, total // (chunk * layers))
        num_blocks = 2 * nblk_moved
        cache = PagedKVCache(layers, num_blocks, bs, heads, head_dim, dtype, dev)
        cache.tensor.normal_()
        blocks = rng.sample(range(num_blocks), nblk_moved)
        region = Region.chunks(range(layers), blocks)
        nbytes = region.nbytes(cache.layout())
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        contig = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        base_d2h = _time(lambda: pinned.copy_(contig, non_blocking=True), repeat, sync)
        base_h2d = _time(lambda: contig.copy_(pinned, non_blocking=True), repeat, sync)
        store = _C.FileStore(tmp)

        def base_file():
            pinned.copy_(contig, non_blocking=True)
            sync()
            store.write("baseline", pinned.data_ptr(), nbytes)
        base_fw = _time(base_file, max(1, repeat // 2), sync)
        for level in levels:
            for mode in modes if level > 0 else modes[:1]:
                kw = {"cuda_mode": mode} if cuda else {}
                s = KVStreamer(cache, level=level, pool_bytes=nbytes + (1 << 20), **kw)
                d2h = _time(lambda: s.gather(region, pinned).wait(), repeat, sync)
                h2d = _time(lambda: s.scatter(region, pinned).wait(), repeat, sync)
                fdest = FileDest(tmp)
                fw = _time(lambda: s.stream_out(region, fdest, "bench").wait(), max(1, repeat // 2), sync)
                row = {"block_tokens": bs, "chunk_bytes": chunk, "bytes": nbytes, "spans": len(region.spans(s.layout)),
                       "level": level, "mode": mode if level > 0 else "per-span",
                       "d2h_GBps": nbytes / d2h / 1e9, "h2d_GBps": nbytes / h2d / 1e9, "file_GBps": nbytes / fw / 1e9,
                       "base_d2h_GBps": nbytes / base_d2h / 1e9, "base_h2d_GBps": nbytes / base_h2d / 1e9,
                       "base_file_GBps": nbytes / base_fw / 1e9}
                row["d2h_ratio"] = row["d2h_GBps"] / row["base_d2h_GBps"]
                row["h2d_ratio"] = row["h2d_GBps"] / row["base_h2d_GBps"]
                row["file_ratio"] = row["file_GBps"] / row["base_file_GBps"]
                rows.append(row)
                s = None  # noqa: F841
        cache = pinned = contig = None  # noqa: F841 - free before the next block size
        if cuda:
            torch.cuda.empty_cache()

    # The newest token of 32 requests across all layers (token-level replication).
    cache = PagedKVCache(layers, 1024, 16, heads, head_dim, dtype, dev)
    blocks = rng.sample(range(1024), 32)
    tok_region = Region.tokens(range(layers), blocks, [rng.randrange(16) for _ in blocks])
    tok_bytes = tok_region.nbytes(cache.layout())
    tok_buf = torch.empty(tok_bytes, dtype=torch.uint8, pin_memory=cuda)
    tok_contig = torch.empty(tok_bytes, dtype=torch.uint8, device=dev)
    token_rows = [{"what": "contiguous copy of the same bytes",
                   "us": 1e6 * _time(lambda: tok_buf.copy_(tok_contig, non_blocking=True), repeat * 4, sync)}]
    for level in levels:
        for mode in modes if level > 0 else modes[:1]:
            kw = {"cuda_mode": mode} if cuda else {}
            s = KVStreamer(cache, level=level, pool_bytes=1 << 24, **kw)
            token_rows.append({"what": f"level {level} {mode if level else 'per-span'}",
                               "us": 1e6 * _time(lambda: s.gather(tok_region, tok_buf).wait(), repeat * 4, sync)})
    overlap = _overlap(dev, layers, heads, head_dim, repeat) if cuda else None
    result = {"card": card, "device": str(dev), "torch": torch.__version__, "layers": layers, "kv_heads": heads,
              "head_dim": head_dim, "dtype": "float16", "rows": rows,
              "token": {"requests": 32, "layers": layers, "bytes": tok_bytes, "spans": len(tok_region.spans(cache.layout())),
                        "rows": token_rows}, "overlap": overlap}
    print(f"DéjàVuLib bandwidth on {card}; cache {layers} layers x {heads} KV heads x {head_dim}, fp16; "
          f"ratio = streamed / contiguous copy of the same bytes, same run")
    print(f"{'blk':>4} {'chunk':>7} {'level':>5} {'mode':>8} {'d2h GB/s':>9} {'ratio':>6} {'h2d GB/s':>9} {'ratio':>6} "
          f"{'file GB/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['block_tokens']:>4} {r['chunk_bytes'] // 1024:>5}Ki {r['level']:>5} {r['mode']:>8} "
              f"{r['d2h_GBps']:>9.2f} {r['d2h_ratio']:>6.2f} {r['h2d_GBps']:>9.2f} {r['h2d_ratio']:>6.2f} "
              f"{r['file_GBps']:>9.2f} {r['file_ratio']:>6.2f}")
    print(f"newest token of 32 requests x {layers} layers ({tok_bytes} bytes, "
          f"{result['token']['spans']} spans):")
    for t in token_rows:
        print(f"  {t['what']:<36} {t['us']:>9.1f} us")
    if overlap:
        print(f"decode-shaped GEMM (32x{overlap['k']} @ {overlap['k']}x{overlap['n']} fp16, {overlap['iters']} iters): "
              f"{overlap['alone_ms']:.2f} ms alone, {overlap['with_stream_ms']:.2f} ms while streaming "
              f"{overlap['streamed_mib']} MiB out and in -> {overlap['slowdown']:.3f}x")
    write_json(json_path, result)
    return result


def _overlap(dev, layers, heads, head_dim, repeat) -> dict:
    """Does streaming on its own streams slow the compute stream down?"""
    k, n, iters = 2048, 8192, 400
    a = torch.randn(32, k, dtype=torch.float16, device=dev)
    w = torch.randn(k, n, dtype=torch.float16, device=dev)
    cache = PagedKVCache(layers, 256, 16, heads, head_dim, torch.float16, dev)
    cache.tensor.normal_()
    region = Region.chunks(range(layers), list(range(0, 256, 2)))
    s = KVStreamer(cache, pool_bytes=2 * region.nbytes(cache.layout()) + (4 << 20))
    out_buf = s.pool.alloc(region.nbytes(cache.layout()))
    in_buf = s.pool.alloc(region.nbytes(cache.layout()))

    def gemms():
        for _ in range(iters):
            torch.mm(a, w)

    def timed(with_stream):
        torch.cuda.synchronize(dev)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        futs = []
        if with_stream:  # launched first; they run on their own streams for longer than the GEMMs
            futs = [s.gather(region, out_buf.tensor), s.scatter(region, in_buf.tensor)]
        e0.record()
        gemms()
        e1.record()
        for f in futs:
            f.wait()
        torch.cuda.synchronize(dev)
        return e0.elapsed_time(e1)
    timed(False), timed(True)
    alone = statistics.median(timed(False) for _ in range(repeat))
    both = statistics.median(timed(True) for _ in range(repeat))
    return {"k": k, "n": n, "iters": iters, "alone_ms": alone, "with_stream_ms": both, "slowdown": both / alone,
            "streamed_mib": 2 * region.nbytes(cache.layout()) >> 20}
