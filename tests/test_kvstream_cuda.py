"""DéjàVuLib on CUDA: every level and mode moves exactly the right bytes (skipped without a GPU)."""
import random

import pytest
import torch

from conftest import needs_cuda
from dejavu import _C
from dejavu.kvstream import FileDest, HostMemoryDest, KVStreamer, Region
from kv_helpers import empty_like, filled_cache, region_values

pytestmark = needs_cuda


@pytest.mark.parametrize("split", [False, True])
def test_copy_spans_kernel_against_torch(split):
    """split: the caller passes the largest span, so spans over 64 KiB spread over several blocks."""
    g = torch.Generator().manual_seed(1)
    for trial in range(4):
        src = torch.randint(0, 256, (1 << 21,), generator=g, dtype=torch.uint8).cuda()
        rows, packed = [], 0
        for _ in range(200):
            n = random.choice([1, 3, 16, 64, 4096, 65536 - 16, 65536 + 48, 300001])
            off = random.randrange(0, src.numel() - n)
            if trial % 2 == 0:  # aligned case takes the 16-byte path
                off, n = off & ~15, max(16, n & ~15)
            rows.append((off, packed, n))
            packed += n
        dst = torch.full((packed,), 0xAB, dtype=torch.uint8, device="cuda")  # poisoned
        desc = torch.tensor(rows, dtype=torch.int64, device="cuda")
        _C.cuda_copy_spans(src.data_ptr(), dst.data_ptr(), desc.data_ptr(), len(rows),
                           torch.cuda.current_stream().cuda_stream, max(n for _, _, n in rows) if split else 0)
        torch.cuda.synchronize()
        ref = torch.cat([src[o:o + n] for o, _, n in rows])
        assert torch.equal(dst, ref)


@pytest.mark.parametrize("level,mode", [(0, "staged"), (1, "staged"), (1, "direct"), (3, "staged"), (3, "direct")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_host_round_trip(level, mode, dtype):
    rng = random.Random(level)
    src = filled_cache(layers=5, blocks=64, block_size=16, heads=4, head_dim=64, dtype=dtype, device="cuda", seed=2)
    dst = empty_like(src)
    a = KVStreamer(src, level=level, cuda_mode=mode, pool_bytes=64 << 20, piece_bytes=256 << 10)
    b = KVStreamer(dst, level=level, cuda_mode=mode, pool_bytes=64 << 20, piece_bytes=256 << 10)
    blocks = rng.sample(range(64), 40)
    regions = [Region.chunks([4, 0, 2], blocks), Region.tokens(range(5), blocks, [rng.randrange(16) for _ in blocks])]
    dest = HostMemoryDest()
    for i, r in enumerate(regions):
        a.stream_out(r, dest, f"k{i}").wait(30)
        b.stream_in(dest, f"k{i}", r).wait(30)
        torch.cuda.synchronize()
        assert torch.equal(region_values(dst, r), region_values(src, r))


def test_device_buffer_gather_and_file(tmp_path):
    src = filled_cache(layers=3, blocks=32, block_size=16, heads=2, head_dim=64, dtype=torch.float16, device="cuda")
    s = KVStreamer(src)
    r = Region.chunks([1, 2], [30, 3, 7])
    buf = torch.empty(r.nbytes(s.layout), dtype=torch.uint8, device="cuda")
    s.gather(r, buf).wait()
    assert torch.equal(buf.view(torch.float16).cpu(), region_values(src, r).reshape(-1))
    dest = FileDest(tmp_path)
    s.stream_out(r, dest, "f").wait()
    dst = empty_like(src)
    KVStreamer(dst).stream_in(dest, "f", r).wait()
    torch.cuda.synchronize()
    assert torch.equal(region_values(dst, r), region_values(src, r))


def test_layer_by_layer_waits_for_each_layers_event():
    src = filled_cache(layers=4, blocks=16, block_size=16, heads=2, head_dim=64, dtype=torch.float16, device="cuda")
    s = KVStreamer(src, level=2)
    r = Region.chunks(range(4), [1, 5, 9])
    compute = torch.cuda.Stream()
    events = []
    with torch.cuda.stream(compute):
        for layer in range(4):
            torch.cuda._sleep(2_000_000)         # a slow "layer" ...
            src.tensor[layer, [1, 5, 9]] += 1.0  # ... that writes its KV
            events.append(compute.record_event())
    expect = None
    dest = HostMemoryDest()
    f = s.stream_out(r, dest, "lbl", layer_events=events)
    f.wait(30)
    torch.cuda.synchronize()
    expect = region_values(src, r)
    dst = empty_like(src)
    KVStreamer(dst, level=2).stream_in(dest, "lbl", r, per_layer=True).wait(30)
    torch.cuda.synchronize()
    assert torch.equal(region_values(dst, r), expect)  # the +1 of every layer arrived


def _ipc_receiver(q_out, q_in, nbytes):
    from dejavu.kvstream.ipc import IpcInbox

    inbox = IpcInbox(nbytes)
    inbox.buffer.zero_()
    torch.cuda.synchronize()
    q_out.put(inbox.buffer)              # shared as a CUDA IPC handle
    key, off, n, checksum = q_in.get(timeout=60)
    got = inbox.view(off, n)
    q_out.put(int(got.to(torch.int64).sum().item()) == checksum)


def test_cuda_ipc_into_another_process():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_ipc_receiver, args=(q_out, q_in, 8 << 20))
    p.start()
    try:
        from dejavu.kvstream.ipc import CudaIpcDest

        remote = q_out.get(timeout=60)
        src = filled_cache(layers=3, blocks=32, block_size=16, heads=2, head_dim=64, dtype=torch.float16, device="cuda")
        r = Region.chunks([0, 2], [4, 9, 1])
        dest = CudaIpcDest(remote)
        buf = torch.empty(r.nbytes(KVStreamer(src).layout), dtype=torch.uint8, device="cuda")
        KVStreamer(src).gather(r, buf).wait()
        dest.put("req", buf).wait()
        off, n = dest.location("req")
        q_in.put(("req", off, n, int(buf.to(torch.int64).sum().item())))
        assert q_out.get(timeout=60) is True
    finally:
        p.join(60)
    assert p.exitcode == 0


def _nccl_rank(rank, port, q):
    import datetime

    import torch.distributed as dist

    from dejavu.kvstream.dist import ProcessGroupDest

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120), device_id=dev)
    try:
        src = filled_cache(layers=3, blocks=64, block_size=16, heads=4, head_dim=64, dtype=torch.float16, device=dev,
                           seed=3)
        regions = [(Region.chunks([0, 1, 2], [5, 40, 7, 33, 2]), Region.chunks([0, 1, 2], [60, 1, 9, 8, 30])),
                   (Region.chunks([1, 2], list(range(20, 50))), Region.chunks([1, 2], list(range(0, 30))))]
        peer = ProcessGroupDest(1 - rank)
        assert peer.device_direct
        if rank == 0:
            s = KVStreamer(src, peer_piece_bytes=48 << 10)  # many pieces: both buffers reused, across transfers
            for sent, _ in regions:
                s.stream_out(sent, peer, "kv").wait(60)
            torch.cuda.synchronize()
        else:
            dst = empty_like(src)
            s = KVStreamer(dst)
            oks = []
            for sent, recvd in regions:
                s.stream_in(peer, "kv", recvd).wait(60)
                oks.append(torch.equal(region_values(dst, recvd), region_values(src, sent)))
            q.put(oks)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two GPUs needs two")
def test_nccl_stream_between_gpus_is_exact():
    """GPU -> remote GPU over NCCL, pipelined in small pieces, into different blocks on the receiver."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        assert q.get(timeout=180) == [True, True]
    finally:
        for p in procs:
            p.join(60)
    assert all(p.exitcode == 0 for p in procs)


def _export_on_gpu1(q_out, q_in, nbytes):
    from dejavu.kvstream.ipc import export_tensor

    torch.cuda.set_device(1)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:1")
    torch.cuda.synchronize()
    q_out.put(export_tensor(buf))        # plain values: the wire format the deployment uses
    want = q_in.get(timeout=60)
    q_out.put(bool(torch.equal(buf.cpu(), want)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ipc_import_onto_another_gpu():
    """A prompt worker on GPU 0 writes with its own copy kernel into a token worker's cache on GPU 1."""
    import torch.multiprocessing as mp

    from dejavu.kvstream.ipc import import_tensor

    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_export_on_gpu1, args=(q_out, q_in, 1 << 20))
    p.start()
    try:
        torch.cuda.set_device(0)
        remote = import_tensor(q_out.get(timeout=60), device=0)
        src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda:0")
        rows = [(0, 4096, 65536), (131072, 0, 4096), (262144, 524288, 300000)]
        desc = torch.tensor(rows, dtype=torch.int64, device="cuda:0")
        _C.cuda_copy_spans(src.data_ptr(), remote.data_ptr(), desc.data_ptr(), len(rows),
                           torch.cuda.current_stream(0).cuda_stream, 300000)
        torch.cuda.synchronize(0)
        want = torch.zeros(1 << 20, dtype=torch.uint8)
        s = src.cpu()
        for so, do, n in rows:
            want[do:do + n] = s[so:so + n]
        q_in.put(want)
        assert q_out.get(timeout=60) is True
    finally:
        p.join(60)
    assert p.exitcode == 0
