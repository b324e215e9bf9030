"""Transfers through a torch.distributed process group: NCCL between GPUs (GPU -> remote GPU,
across hosts), gloo between CPU processes (the CPU-testable path of the same code).

Two-sided like MPI: a send on one rank matches a recv on its peer, in order. A small header
(payload bytes, CRC-32C) precedes each payload, so a size mismatch or corruption fails the recv.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _C
from .futures import Future, PolledCompletion


def _completion(works, check=None) -> PolledCompletion:
    return PolledCompletion(lambda: all(w.is_completed() for w in works), check,
                            block=lambda timeout: _wait_works(works, timeout))


def _wait_works(works, timeout):
    import datetime

    for w in works:
        if timeout is None:
            w.wait()
        else:
            w.wait(datetime.timedelta(seconds=timeout))


class ProcessGroupChannel:
    """Sends/receives uint8 tensors (host or device) to/from one peer rank.

    Over NCCL (`device_direct`), KVStreamer.stream_out/stream_in move a region GPU -> GPU without
    touching host memory: the blocks are gathered on the device into pieces, and each piece is sent
    while the next one is gathered (and on the receiver scattered while the next one arrives)."""

    def __init__(self, peer: int, group=None):
        self.peer, self.group = peer, group

    @property
    def device_direct(self) -> bool:
        return dist.get_backend(self.group) == "nccl"

    def dist_isend(self, t: torch.Tensor):
        return dist.isend(t, self.peer, group=self.group)

    def dist_irecv(self, t: torch.Tensor):
        return dist.irecv(t, self.peer, group=self.group)

    def send(self, what: str, buf: torch.Tensor) -> Future:
        crc = _C.crc32c(buf.data_ptr(), buf.numel()) if buf.device.type == "cpu" else 0
        head = torch.tensor([buf.numel(), crc], dtype=torch.int64, device=buf.device)
        works = [dist.isend(head, self.peer, group=self.group), dist.isend(buf, self.peer, group=self.group)]
        return Future(f"send {what} to rank {self.peer}", parts=[_completion(works)], keep=[buf, head], nbytes=buf.numel())

    def recv(self, what: str, buf: torch.Tensor) -> Future:
        head = torch.empty(2, dtype=torch.int64, device=buf.device)
        dist.recv(head, self.peer, group=self.group)
        n, crc = (int(x) for x in head.tolist())
        if n != buf.numel():
            return Future.failed(f"recv {what} from rank {self.peer}", f"message is {n} bytes, buffer {buf.numel()}")
        work = dist.irecv(buf, self.peer, group=self.group)

        def check():
            if buf.device.type == "cpu" and _C.crc32c(buf.data_ptr(), n) != crc:
                raise IOError(f"{what} failed its checksum")
        return Future(f"recv {what} from rank {self.peer}", parts=[_completion([work], check)], keep=[buf], nbytes=n)


class ProcessGroupDest(ProcessGroupChannel):
    """The channel as a Destination (two-sided: puts and gets must be issued in the same order)."""
    name = "process-group"

    def put(self, key: str, buf: torch.Tensor) -> Future:
        return self.send(repr(key), buf)

    def get(self, key: str, buf: torch.Tensor) -> Future:
        return self.recv(repr(key), buf)
