"""CUDA IPC: write into another process's GPU memory on the same host (works with several
processes on one GPU, where NCCL refuses two ranks).

The receiving process allocates a device buffer and shares it once (torch.multiprocessing turns a
CUDA tensor into an IPC handle when it is sent through a multiprocessing queue or pipe). The sender
opens it as a tensor and copies chunks into ranges of it on a dedicated stream; `location(key)`
says where a chunk landed, and the control plane tells the receiver (the receiver's own
`IpcInbox.view(offset, nbytes)` then reads it without a copy).
"""
from __future__ import annotations

import torch

from .futures import Future
from .transports import Destination


class IpcInbox:
    """Receiver side: one device buffer that peers write into."""

    def __init__(self, nbytes: int, device="cuda"):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer[offset:offset + nbytes]


class CudaIpcDest(Destination):
    """Sender side, over a peer's shared device buffer (a tensor received through torch.multiprocessing)."""
    name = "cuda-ipc"

    def __init__(self, remote: torch.Tensor):
        if remote.device.type != "cuda" or remote.dtype != torch.uint8:
            raise ValueError("CudaIpcDest needs the peer's uint8 CUDA buffer")
        self.remote = remote
        self.stream = torch.cuda.Stream(remote.device)
        self.where: dict[str, tuple[int, int]] = {}
        self.next = 0

    def location(self, key: str) -> tuple[int, int]:
        return self.where[key]

    def put(self, key: str, buf: torch.Tensor) -> Future:
        n = buf.numel()
        if key in self.where and self.where[key][1] >= n:
            off = self.where[key][0]
        else:
            if self.next + n > self.remote.numel():
                return Future.failed(f"ipc put {key!r}", f"peer buffer full ({self.remote.numel()} bytes)")
            off, self.next = self.next, self.next + n
        self.where[key] = (off, n)
        self.stream.wait_stream(torch.cuda.current_stream(self.remote.device))
        with torch.cuda.stream(self.stream):
            self.remote[off:off + n].copy_(buf, non_blocking=True)
        evt = self.stream.record_event()
        return Future(f"ipc put {key!r}", parts=[evt], keep=[buf], nbytes=n, event=evt)

    def get(self, key: str, buf: torch.Tensor) -> Future:
        if key not in self.where:
            return Future.failed(f"ipc get {key!r}", "no such chunk")
        off, n = self.where[key]
        with torch.cuda.stream(self.stream):
            buf[:n].copy_(self.remote[off:off + n], non_blocking=True)
        evt = self.stream.record_event()
        return Future(f"ipc get {key!r}", parts=[evt], keep=[buf], nbytes=n, event=evt)

    def size(self, key: str) -> int:
        return self.where.get(key, (0, -1))[1]


def export_tensor(t: torch.Tensor) -> dict:
    """A CUDA tensor's IPC handle as plain values (bytes, ints) for an explicit wire format."""
    storage = t.untyped_storage()
    device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = storage._share_cuda_()
    return {"device": int(device), "handle": handle, "size": int(size), "offset": int(offset),
            "rc_handle": rc_handle, "rc_offset": int(rc_offset), "ev_handle": ev_handle, "ev_sync": bool(ev_sync),
            "byte_offset": t.storage_offset() * t.element_size(), "nbytes": t.numel() * t.element_size()}


def import_tensor(d: dict, device: int | None = None) -> torch.Tensor:
    """Open a peer's exported CUDA tensor (same host) as a flat uint8 tensor over its memory.

    `device`: the GPU whose kernels will access it (default: the one it lives on). The handle is
    opened in that device's context, with peer access enabled as needed (cudaIpcOpenMemHandle's
    lazy peer access); opened in the owner's context instead, the mapping would be invisible to
    kernels on another GPU (an illegal address). The returned tensor then reports `device` although
    its bytes live on the peer's GPU: use it for pointers and copies, not for compute."""
    torch.cuda._lazy_init()
    dev = d["device"] if device is None else int(device)
    storage = torch.UntypedStorage._new_shared_cuda(dev, d["handle"], d["size"], d["offset"], d["rc_handle"],
                                                    d["rc_offset"], d["ev_handle"], d["ev_sync"])
    t = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", dev))
    t.set_(storage, d["byte_offset"], (d["nbytes"],))
    return t
