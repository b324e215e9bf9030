"""KV streamed from one host to another by DéjàVuLib's checksummed TCP destination, against a raw
socket copy of the same bytes between the same two hosts, in the same run.

Two roles, one per host; the cluster token comes from $DEJAVU_CLUSTER_TOKEN:
    python -m dejavu.bench.kvhosts recv --bind ADDR          prints {"kv_port", "raw_port"}, serves until stdin closes
    python -m dejavu.bench.kvhosts send --peer ADDR --kv-port P --raw-port Q [--total-mib ...]
The sender's cache is paged (all layers x a random subset of blocks), so DéjàVuLib gathers it before
sending; the raw copy sends one contiguous buffer of the same size. Each transfer is timed on the
sender from its start to the receiver's acknowledgement that every byte is in its memory (the TCP
store's reply; one byte back on the raw socket); the ratio is the median over rounds of raw time /
DéjàVuLib time within a round. Before timing, the streamed region is fetched back
and compared: a wrong byte fails the run. benchmarks/kv_between_hosts.py runs both roles in two
network-namespace hosts.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import struct
import sys
import time

import torch

_LEN = struct.Struct(">Q")


def _raw_serve(listener: socket.socket) -> None:
    """Each connection: frames of (length, bytes), each acknowledged with one byte once received."""
    from ..kvstream.net import recv_exact, serve_connections

    def handle(sock):
        buf = bytearray()
        head = bytearray(_LEN.size)
        try:
            while True:
                recv_exact(sock, memoryview(head))
                (n,) = _LEN.unpack(head)
                if len(buf) < n:
                    buf = bytearray(n)
                recv_exact(sock, memoryview(buf)[:n])
                sock.sendall(b"k")
        except (ConnectionError, OSError):
            sock.close()
    serve_connections(listener, handle, "raw-copy")


def recv(bind: str) -> int:
    from ..kvstream import TcpReplicaServer
    from ..kvstream.net import listen

    kv = TcpReplicaServer(os.environ["DEJAVU_CLUSTER_TOKEN"], host=bind)
    raw = listen(bind)
    _raw_serve(raw)
    print(json.dumps({"kv_port": kv.port, "raw_port": raw.getsockname()[1]}), flush=True)
    sys.stdin.read()
    kv.stop()
    raw.close()
    return 0


def send(peer: str, kv_port: int, raw_port: int, layers: int, heads: int, head_dim: int, block_size: int,
         total_mib: int, repeat: int) -> dict:
    from ..engine.kv_cache import PagedKVCache
    from ..kvstream import KVStreamer, Region, TcpDest

    token = os.environ["DEJAVU_CLUSTER_TOKEN"]
    dtype = torch.float16
    chunk = 2 * block_size * heads * head_dim * dtype.itemsize
    moved = max(1, (total_mib << 20) // (chunk * layers))
    num_blocks = 2 * moved
    rng = random.Random(0)
    cache = PagedKVCache(layers, num_blocks, block_size, heads, head_dim, dtype, torch.device("cpu"))
    cache.tensor.normal_(generator=torch.Generator().manual_seed(0))
    region = Region.chunks(range(layers), rng.sample(range(num_blocks), moved))
    nbytes = region.nbytes(cache.layout())
    streamer = KVStreamer(cache, pool_bytes=nbytes + (1 << 20))
    dest = TcpDest(peer, kv_port, token, timeout=120)

    # Correctness first: stream out, fetch back, compare.
    streamer.stream_out(region, dest, "kv").wait(300)
    want, got = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    streamer.gather(region, want).wait(60)
    dest.get("kv", got).wait(300)
    if not torch.equal(want, got):
        raise RuntimeError("the region streamed to the peer differs from the one sent")

    raw = socket.create_connection((peer, raw_port), timeout=120)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    contig = memoryview(want.numpy())

    def raw_copy():
        raw.sendall(_LEN.pack(nbytes))
        raw.sendall(contig)
        if raw.recv(1) != b"k":
            raise RuntimeError("the raw-copy receiver closed the connection")

    # Alternate the transfers (a warm-up round first) so that load from elsewhere falls on all alike.
    # "region": one put of the whole region; "by layer": one put per layer, each gathered while the
    # one before is on the wire (how a prompt's KV leaves layer by layer).
    per_layer = [None] * layers
    runs = {"raw": raw_copy,
            "region": lambda: streamer.stream_out(region, dest, "kv").wait(300),
            "by layer": lambda: streamer.stream_out(region, dest, "kv", layer_events=per_layer).wait(300)}
    times = {name: [] for name in runs}
    for i in range(repeat + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    t = {name: statistics.median(v) for name, v in times.items()}
    # The ratio pairs each transfer with the raw copy of its own round: load from other jobs on a
    # shared machine drifts between rounds more than within one.
    rows = [{"mode": name, "bytes": nbytes, "chunk_bytes": chunk, "spans": len(region.spans(cache.layout())),
             "dejavulib_GBps": nbytes / t[name] / 1e9, "raw_GBps": nbytes / t["raw"] / 1e9,
             "ratio": statistics.median(r / d for r, d in zip(times["raw"], times[name]))}
            for name in ("region", "by layer")]
    raw.close()
    return {"peer": peer, "layers": layers, "kv_heads": heads, "head_dim": head_dim, "block_tokens": block_size,
            "dtype": "float16", "repeat": repeat, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dejavu.bench.kvhosts", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", default="127.0.0.1")
    s = sub.add_parser("send")
    s.add_argument("--peer", required=True)
    s.add_argument("--kv-port", type=int, required=True)
    s.add_argument("--raw-port", type=int, required=True)
    s.add_argument("--layers", type=int, default=24)
    s.add_argument("--kv-heads", type=int, default=16)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--total-mib", type=int, default=128)
    s.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    if a.role == "recv":
        return recv(a.bind)
    print(json.dumps(send(a.peer, a.kv_port, a.raw_port, a.layers, a.kv_heads, a.head_dim, a.block_size,
                          a.total_mib, a.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
