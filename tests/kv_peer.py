"""A second process for cross-process (and cross-host) DéjàVuLib tests. The cluster token comes from
$DEJAVU_CLUSTER_TOKEN (never argv). Exit status 0 means the transfer arrived bit-exactly.

    tcp-push HOST PORT [big]       push a seeded region to a TcpReplicaServer at HOST:PORT
    tcp-hold BIND [big]            a TcpReplicaServer on BIND: prints its port; on a line "check" from
                                   stdin, streams the pushed region back in and prints OK / MISMATCH
    replica-push HOST PORT NAME    DéjàVuLib's replica sender: a seeded cache's slots and blocks as NAME
    replica-hold BIND              a replica holder (ReplicaServer) on BIND: prints its port, serves
                                   until stdin closes
    replica-fetch HOST PORT NAME   fetch NAME's blocks from the holder; compare with the seeded cache
    mpirun -n 2 python tests/kv_peer.py mpi     rank 0 streams to rank 1, which verifies
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from dejavu.kvstream import KVStreamer, Region, TcpDest, TcpReplicaServer  # noqa: E402
from kv_helpers import empty_like, filled_cache, region_values  # noqa: E402

REGION = Region.chunks([0, 3], [9, 2, 14, 5])
TOKENS = Region.tokens([1, 2], [4, 8, 1], [3, 0, 2])
BIG = {"layers": 4, "blocks": 128, "block_size": 16, "heads": 4, "head_dim": 64}  # 8 MiB in fp16
BIG_REGION = Region.chunks(range(4), list(range(127, -1, -1)))
REPLICA = {"layers": 3, "blocks": 10, "block_size": 4, "heads": 2, "head_dim": 8}
SLOTS = [([0, 1, 2, 3], 0, 13), ([7], 0, 3)]  # (block table, start, end): positions written by a step
BLOCKS = [5, 8]                                # whole blocks re-seeded


def _token() -> str:
    return os.environ["DEJAVU_CLUSTER_TOKEN"]


def _regions(big: bool):
    return {"peer.big": BIG_REGION} if big else {"peer.chunks": REGION, "peer.tokens": TOKENS}


def _cache(big: bool):
    return filled_cache(seed=42, dtype=torch.float16, **(BIG if big else {}))


def tcp_push(host, port, big=False):
    src = _cache(big)
    dest = TcpDest(host, port, _token(), timeout=float(os.environ.get("KV_PEER_TIMEOUT", 30)))
    s = KVStreamer(src, pool_bytes=16 << 20)
    print("connected", flush=True)
    for key, region in _regions(big).items():
        s.stream_out(region, dest, key).wait(120)
    return 0


def tcp_hold(bind, big=False):
    server = TcpReplicaServer(_token(), host=bind)
    print(server.port, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() != "check":
                continue
            src = _cache(big)
            dst = empty_like(src)
            s = KVStreamer(dst, pool_bytes=16 << 20)
            dest = TcpDest(*server.address, _token())
            bad = []
            for key, region in _regions(big).items():
                s.stream_in(dest, key, region).wait(60)
                if not torch.equal(region_values(dst, region), region_values(src, region)):
                    bad.append(key)
            print("MISMATCH " + " ".join(bad) if bad else f"OK {sorted(server.keys())}", flush=True)
            return 1 if bad else 0
        return 2
    finally:
        server.stop()


def replica_push(host, port, name):
    from dejavu import _C

    cache = filled_cache(seed=7, dtype=torch.float16, **REPLICA)
    sender = _C.ReplicaSender(cache.layout(), cache.tensor.data_ptr(), -1, name, _token(), "float16", 10.0)
    try:
        sender.set_holder(host, port)
        sender.push_slots(1, SLOTS, 0)
        sender.push_blocks(2, BLOCKS, 0)
        if not sender.drain(30):
            print("replica sender did not drain", flush=True)
            return 1
        events = [(e.kind, e.tag, e.error) for e in sender.wait_events(5.0, 0.0)]
        print(events, flush=True)
        return 0 if events == [("replicated", 1, ""), ("rereplicated", 2, "")] else 1
    finally:
        sender.close()


def replica_hold(bind):
    from dejavu.kvstream.replica import ReplicaServer

    srv = ReplicaServer(_token(), bind)
    print(srv.port, flush=True)
    sys.stdin.read()
    srv.stop()
    return 0


def replica_fetch(host, port, name):
    from dejavu.kvstream.replica import ReplicaClient, block_checksums

    want = filled_cache(seed=7, dtype=torch.float16, **REPLICA).tensor
    c = ReplicaClient(host, port, _token())
    try:
        blocks = [0, 1, 2, 3, 7] + BLOCKS
        data, chk = c.get_blocks(name, blocks)
    finally:
        c.close()
    L, _, _, bs, h, d = want.shape
    got = data.view(torch.float16).view(L, len(blocks), 2, bs, h, d)
    mine, theirs = block_checksums(got), chk.view(len(blocks), bs)
    where = {b: i for i, b in enumerate(blocks)}
    written = [(t[p // bs], p % bs) for t, start, end in SLOTS for p in range(start, end)]
    written += [(b, s) for b in BLOCKS for s in range(bs)]
    ok = True
    for b, s in written:  # every slot the stream wrote: at the same (block, slot), its checksum verified
        i = where[b]
        ok = ok and torch.equal(got[:, i, :, s], want[:, b, :, s]) and bool(mine[i, s] == theirs[i, s] != 0)
    print("fetched OK" if ok else "fetched MISMATCH", flush=True)
    return 0 if ok else 1


def mpi():
    from mpi4py import MPI

    from dejavu.kvstream.mpi import MpiDest

    src = _cache(False)
    rank = MPI.COMM_WORLD.Get_rank()
    if rank == 0:
        s = KVStreamer(src)
        s.stream_out(REGION, MpiDest(1), "m.chunks").wait(30)
        s.stream_out(TOKENS, MpiDest(1), "m.tokens").wait(30)
        return 0
    dst = empty_like(src)
    s = KVStreamer(dst)
    s.stream_in(MpiDest(0), "m.chunks", REGION).wait(30)
    s.stream_in(MpiDest(0), "m.tokens", TOKENS).wait(30)
    ok = all(torch.equal(region_values(dst, r), region_values(src, r)) for r in (REGION, TOKENS))
    print("mpi round trip", "OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    big = "big" in args
    args = [a for a in args if a != "big"]
    if mode == "tcp-push":
        return tcp_push(args[0], int(args[1]), big)
    if mode == "tcp-hold":
        return tcp_hold(args[0], big)
    if mode == "replica-push":
        return replica_push(args[0], int(args[1]), args[2])
    if mode == "replica-hold":
        return replica_hold(args[0])
    if mode == "replica-fetch":
        return replica_fetch(args[0], int(args[1]), args[2])
    if mode == "mpi":
        return mpi()
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
