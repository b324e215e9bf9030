"""A second process for cross-process DéjàVuLib tests.

    python tests/kv_peer.py tcp-push HOST PORT TOKEN     push a seeded region to a TcpReplicaServer
    mpirun -n 2 python tests/kv_peer.py mpi              rank 0 streams to rank 1, which verifies
Exit status 0 means the transfer arrived bit-exactly.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from dejavu.kvstream import KVStreamer, Region, TcpDest  # noqa: E402
from kv_helpers import empty_like, filled_cache, region_values  # noqa: E402

REGION = Region.chunks([0, 3], [9, 2, 14, 5])
TOKENS = Region.tokens([1, 2], [4, 8, 1], [3, 0, 2])


def main():
    mode = sys.argv[1]
    src = filled_cache(seed=42, dtype=torch.float16)
    if mode == "tcp-push":
        host, port, token = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        dest = TcpDest(host, port, token)
        s = KVStreamer(src)
        s.stream_out(REGION, dest, "peer.chunks").wait(30)
        s.stream_out(TOKENS, dest, "peer.tokens").wait(30)
        return 0
    if mode == "mpi":
        from mpi4py import MPI

        from dejavu.kvstream.mpi import MpiDest

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
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
