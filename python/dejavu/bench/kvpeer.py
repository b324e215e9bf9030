"""`dejavu bench kvpeer`: DéjàVuLib GPU -> remote GPU (NCCL) against a raw NCCL send/recv of the
same bytes, in the same run (gloo between two CPU processes on a machine without GPUs).

Two processes, one per GPU (rank r on cuda:r). The region moved is all layers x a random subset of
blocks scattered through rank 0's cache, into a different random subset of rank 1's cache:
DéjàVuLib gathers it on the device in pieces and sends each piece while gathering the next, and
the receiver scatters each piece while the next arrives. The baseline is one `dist.send` of a
contiguous device tensor of the same size. A transfer's time runs from a barrier to the moment
the receiver's bytes are in place (its stream synchronised); medians of --repeat after a warm-up.
Before timing, the received region is compared with the sender's: a wrong byte fails the run.
"""
from __future__ import annotations

import datetime
import os
import random
import socket

import torch

from . import write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, cfg: dict, q) -> None:
    import torch.distributed as dist

    from ..engine.kv_cache import PagedKVCache
    from ..kvstream import KVStreamer, Region
    from ..kvstream.dist import ProcessGroupDest
    from .kvstream import _time

    cuda = cfg["device"] == "cuda"
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    kw = {}
    if cuda and cfg["nccl_init"] == "eager":
        kw["device_id"] = dev
        if cfg["high_priority"]:  # NCCL's kernels get SMs ahead of the gather/scatter kernels beside them
            opts = dist.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = True
            kw["pg_options"] = opts
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=300), **kw)
    try:
        sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
        peer = ProcessGroupDest(1 - rank)
        dtype = torch.float16
        rows = []

        def timed(fn) -> float:
            """From a barrier (both ranks ready) to this rank's bytes in place: no barrier closes the
            window, so the receiver's time is the transfer's."""
            return _time(fn, cfg["repeat"], sync, before=dist.barrier)

        for bs in cfg["block_sizes"]:
            layers, heads, hd = cfg["layers"], cfg["heads"], cfg["head_dim"]
            chunk = 2 * bs * heads * hd * 2
            moved = max(1, (cfg["total_mib"] << 20) // (chunk * layers))
            num_blocks = 2 * moved
            rng = random.Random(bs)  # the same on both ranks
            src_blocks = rng.sample(range(num_blocks), moved)
            dst_blocks = rng.sample(range(num_blocks), moved)
            src = PagedKVCache(layers, num_blocks, bs, heads, hd, dtype, dev)
            g = torch.Generator(device=dev).manual_seed(bs)
            src.tensor.normal_(generator=g)  # rank 1 builds the same cache to check what it receives
            src_region = Region.chunks(range(layers), src_blocks)
            dst_region = Region.chunks(range(layers), dst_blocks)
            nbytes = src_region.nbytes(src.layout())
            contig = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            if rank == 0:
                raw = timed(lambda: dist.send(contig, 1))
            else:
                raw = timed(lambda: dist.recv(contig, 0))
            gather_s = 0.0
            if cuda:  # the device-side gather alone (into one contiguous device buffer): the copy kernel's speed
                gs = KVStreamer(src)
                gather_s = timed(lambda: gs.gather(src_region, contig).wait(60))
            contig = None  # noqa: F841 - freed before the streamed runs
            for piece_mib in cfg["piece_mibs"] if cuda else [0]:
                if rank == 0:
                    s = KVStreamer(src, pool_bytes=nbytes + (1 << 20), **({"peer_piece_bytes": piece_mib << 20}
                                                                             if cuda else {}))
                    stream = lambda: s.stream_out(src_region, peer, "kv").wait(300)  # noqa: E731
                else:
                    dst = PagedKVCache(layers, num_blocks, bs, heads, hd, dtype, dev)
                    s = KVStreamer(dst, pool_bytes=nbytes + (1 << 20))
                    stream = lambda: s.stream_in(peer, "kv", dst_region).wait(300)  # noqa: E731
                    ok = stream()
                    want, got = torch.empty(nbytes, dtype=torch.uint8, device=dev), \
                        torch.empty(nbytes, dtype=torch.uint8, device=dev)
                    KVStreamer(src).gather(src_region, want).wait(60)
                    s.gather(dst_region, got).wait(60)
                    if not ok or not torch.equal(want, got):
                        raise RuntimeError(f"block size {bs}: the received region differs from the sent one")
                    want = got = None  # noqa: F841
                if rank == 0:
                    stream()
                t = timed(stream)
                if cfg["trace_dir"] and cuda:  # one more transfer, under the profiler: its kernels' timeline
                    dist.barrier()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        stream()
                        sync()
                    prof.export_chrome_trace(os.path.join(cfg["trace_dir"], f"kvpeer_b{bs}_p{piece_mib}_rank{rank}.json"))
                if rank == 1:
                    rows.append({"block_tokens": bs, "chunk_bytes": chunk, "bytes": nbytes, "piece_mib": piece_mib,
                                 "spans": len(src_region.spans(src.layout())),
                                 "dejavulib_GBps": nbytes / t / 1e9, "raw_GBps": nbytes / raw / 1e9,
                                 "ratio": raw / t, "gather_GBps": nbytes / gather_s / 1e9 if gather_s else None})
                s = None  # noqa: F841
            if cuda:
                torch.cuda.empty_cache()
        if rank == 1:
            card = torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)"
            q.put({"card": card, "torch": torch.__version__, "backend": "nccl" if cuda else "gloo",
                   "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, "rows": rows})
    except Exception as e:  # noqa: BLE001 - reported to the parent
        q.put({"error": f"rank {rank}: {type(e).__name__}: {e}"})
        raise
    finally:
        dist.destroy_process_group()


def run(device: str, layers: int, heads: int, head_dim: int, block_sizes: list[int], piece_mibs: list[int],
        total_mib: int, repeat: int, json_path: str | None, high_priority: bool = False, nccl_init: str = "eager",
        trace_dir: str | None = None) -> dict:
    import torch.multiprocessing as mp

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < 2:
        raise RuntimeError(f"GPU -> GPU over NCCL needs two GPUs (one per rank); this host has "
                           f"{torch.cuda.device_count()}")
    cfg = {"device": device, "layers": layers, "heads": heads, "head_dim": head_dim, "block_sizes": block_sizes,
           "piece_mibs": piece_mibs, "total_mib": total_mib, "repeat": repeat,
           "high_priority": high_priority, "nccl_init": nccl_init, "trace_dir": trace_dir}
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, cfg, q)) for r in range(2)]
    for p in procs:
        p.start()
    result = None
    try:
        result = q.get(timeout=1800)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    if "error" in result:
        raise RuntimeError(result["error"])
    result.update({"high_priority_nccl_stream": high_priority, "nccl_init": nccl_init, "copy_blocks": os.environ.get("DEJAVU_COPY_BLOCKS"),
                   "layers": layers, "kv_heads": heads, "head_dim": head_dim, "dtype": "float16"})
    print(f"DéjàVuLib peer transfer on {result['card']} ({result['backend']}"
          f"{' ' + result['nccl'] if result['nccl'] else ''}); cache {layers} layers x {heads} KV heads x "
          f"{head_dim}, fp16; ratio = DéjàVuLib / raw send of the same bytes, same run")
    print(f"{'blk':>4} {'chunk':>7} {'MiB':>6} {'spans':>7} {'piece':>6} {'DéjàVuLib GB/s':>15} {'raw GB/s':>9} "
          f"{'ratio':>6} {'gather GB/s':>11}")
    for r in result["rows"]:
        print(f"{r['block_tokens']:>4} {r['chunk_bytes'] // 1024:>5}Ki {r['bytes'] >> 20:>6} {r['spans']:>7} "
              f"{(str(r['piece_mib']) + 'Mi') if r['piece_mib'] else '-':>6} {r['dejavulib_GBps']:>15.2f} "
              f"{r['raw_GBps']:>9.2f} {r['ratio']:>6.2f} "
              f"{r['gather_GBps'] if r['gather_GBps'] is None else round(r['gather_GBps'], 1)!s:>11}")
    write_json(json_path, result)
    return result
