"""Host-to-host transfers between MPI ranks (runs launched with mpirun), through mpi4py.

Two-sided: a put on one rank is matched by a get of the same key on its peer. Each message is a
fixed header (key length, payload bytes, CRC-32C) followed by the key and the payload, so a
mismatched key or a corrupted payload fails the get with a clear error.
"""
from __future__ import annotations

import struct
import threading


from .. import _C
from .futures import Future, PolledCompletion
from .transports import Destination, _check_buf

_HEADER = struct.Struct("<IQI")  # key length, payload bytes, payload CRC-32C
_TAG_BASE = 7100


def _testall(reqs) -> bool:
    from mpi4py import MPI

    return MPI.Request.Testall(reqs)


class MpiDest(Destination):
    name = "mpi"

    def __init__(self, peer: int, comm=None, channel: int = 0):
        from mpi4py import MPI

        self.comm = comm or MPI.COMM_WORLD
        self.peer = peer
        self.tag = _TAG_BASE + 2 * channel
        self._lock = threading.Lock()

    def put(self, key, buf):
        _check_buf(buf)
        k = key.encode()
        crc = _C.crc32c(buf.data_ptr(), buf.numel())
        head = bytearray(_HEADER.pack(len(k), buf.numel(), crc) + k)
        payload = buf.numpy()
        with self._lock:
            reqs = [self.comm.Isend(head, dest=self.peer, tag=self.tag),
                    self.comm.Isend(payload, dest=self.peer, tag=self.tag + 1)]
        return Future(f"mpi put {key!r} to rank {self.peer}", parts=[PolledCompletion(lambda: _testall(reqs))], keep=[buf, head],
                      nbytes=buf.numel())

    def get(self, key, buf):
        _check_buf(buf)
        from mpi4py import MPI

        status = MPI.Status()
        with self._lock:
            self.comm.Probe(source=self.peer, tag=self.tag, status=status)
            head = bytearray(status.Get_count(MPI.BYTE))
            self.comm.Recv(head, source=self.peer, tag=self.tag)
        klen, n, crc = _HEADER.unpack_from(head)
        got = bytes(head[_HEADER.size:_HEADER.size + klen]).decode()
        if got != key:
            return Future.failed(f"mpi get {key!r} from rank {self.peer}", f"next message is {got!r}, not {key!r}")
        if n > buf.numel():
            return Future.failed(f"mpi get {key!r}", f"message is {n} bytes, buffer {buf.numel()}")
        view = buf[:n].numpy()
        req = self.comm.Irecv(view, source=self.peer, tag=self.tag + 1)

        def check():
            if _C.crc32c(buf.data_ptr(), n) != crc:
                raise IOError(f"payload of {key!r} failed its checksum")
        return Future(f"mpi get {key!r} from rank {self.peer}", parts=[PolledCompletion(lambda: _testall([req]), check)], keep=[buf], nbytes=n)

    def size(self, key):
        raise NotImplementedError("MpiDest is two-sided: sizes travel in the message header")
