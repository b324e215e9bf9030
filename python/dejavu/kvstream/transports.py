"""Destinations a contiguous host buffer can be flushed to and fetched from.

Each `put(key, buf)` / `get(key, buf)` returns a Future; `buf` is a contiguous uint8 CPU tensor
(pinned when it comes from the pool). Host-side work runs on C++ worker threads without the GIL.
  HostMemoryDest   pinned host memory of this process
  FileDest         local disk, crash-consistent (complete and checksummed, or invisible)
  TcpDest          another host's memory through a TcpReplicaServer (token-checked, checksummed)
  MpiDest          (mpi.py) host to host between MPI ranks
  ProcessGroupDest (dist.py) torch.distributed send/recv: gloo on CPU, NCCL between GPUs
"""
from __future__ import annotations

import threading

import torch

from .. import _C
from .auth import new_cluster_token  # noqa: F401 - re-exported
from .futures import Future
from .net import LOOPBACK, Address, advertised

_pool_lock = threading.Lock()
_default_workers: "_C.WorkerPool | None" = None


def default_workers() -> "_C.WorkerPool":
    global _default_workers
    with _pool_lock:
        if _default_workers is None:
            _default_workers = _C.WorkerPool(4)
        return _default_workers


def _check_buf(buf: torch.Tensor) -> None:
    if buf.device.type != "cpu" or buf.dtype != torch.uint8 or not buf.is_contiguous():
        raise ValueError("destination buffers must be contiguous uint8 CPU tensors")


class Destination:
    name = "destination"

    def put(self, key: str, buf: torch.Tensor) -> Future:
        raise NotImplementedError

    def get(self, key: str, buf: torch.Tensor) -> Future:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError


class HostMemoryDest(Destination):
    """Chunks kept in this process's (pinned) host memory."""
    name = "host"

    def __init__(self, pin: bool | None = None, workers=None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.workers = workers or default_workers()
        self.chunks: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def put(self, key, buf):
        _check_buf(buf)
        dst = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=self.pin)
        h = self.workers.gather(buf.data_ptr(), [(0, buf.numel())], dst.data_ptr())

        def publish():
            with self._lock:
                self.chunks[key] = dst
        return Future(f"host put {key!r}", parts=[h], keep=[buf, dst], then=publish, nbytes=buf.numel())

    def get(self, key, buf):
        _check_buf(buf)
        with self._lock:
            src = self.chunks.get(key)
        if src is None:
            return Future.failed(f"host get {key!r}", "no such chunk")
        if src.numel() > buf.numel():
            return Future.failed(f"host get {key!r}", f"chunk is {src.numel()} bytes, buffer {buf.numel()}")
        h = self.workers.gather(src.data_ptr(), [(0, src.numel())], buf.data_ptr())
        return Future(f"host get {key!r}", parts=[h], keep=[buf, src], nbytes=src.numel())

    def size(self, key):
        with self._lock:
            t = self.chunks.get(key)
        return -1 if t is None else t.numel()

    def delete(self, key):
        with self._lock:
            self.chunks.pop(key, None)


class FileDest(Destination):
    name = "file"

    def __init__(self, directory: str, durable: bool = False, workers=None):
        self.store = _C.FileStore(str(directory), durable)
        self.workers = workers or default_workers()

    def put(self, key, buf):
        _check_buf(buf)
        h = self.workers.file_write(self.store, key, buf.data_ptr(), buf.numel())
        return Future(f"file put {key!r} in {self.store.dir}", parts=[h], keep=[buf], nbytes=buf.numel())

    def get(self, key, buf):
        _check_buf(buf)
        h = self.workers.file_read(self.store, key, buf.data_ptr(), buf.numel())
        return Future(f"file get {key!r} from {self.store.dir}", parts=[h], keep=[buf], nbytes=buf.numel())

    def size(self, key):
        return self.store.size(key)

    def delete(self, key):
        return self.store.remove(key)


class TcpReplicaServer:
    """Keeps chunks pushed by peers in this process's host memory. Binds `host` (127.0.0.1 unless
    told); peers dial `self.address` (`advertise`, else `host`)."""

    def __init__(self, token: str, host: str = LOOPBACK, port: int = 0, max_bytes: int = 0,
                 advertise: str | None = None):
        advertise = advertised(host, advertise)
        self.host, self.token = host, token
        self.server = _C.TcpStoreServer(host, port, token, max_bytes)
        self.port = self.server.port
        self.address = Address(advertise, self.port)

    def get_into(self, key: str, buf: torch.Tensor) -> int:
        _check_buf(buf)
        return self.server.get(key, buf.data_ptr(), buf.numel())

    def keys(self):
        return self.server.keys()

    def stats(self):
        return self.server.stats()

    def stop(self):
        self.server.stop()


class TcpDest(Destination):
    name = "tcp"

    def __init__(self, host: str, port: int, token: str, timeout: float = 30.0, workers=None, connections: int = 1):
        self.clients = [_C.TcpStoreClient(host, port, token, timeout) for _ in range(max(1, connections))]
        self.workers = workers or default_workers()
        self._next = 0
        self.peer = f"{host}:{port}"

    def _client(self):
        self._next = (self._next + 1) % len(self.clients)
        return self.clients[self._next]

    def put(self, key, buf):
        _check_buf(buf)
        h = self.workers.tcp_put(self._client(), key, buf.data_ptr(), buf.numel())
        return Future(f"tcp put {key!r} to {self.peer}", parts=[h], keep=[buf], nbytes=buf.numel())

    def put_spans(self, key, base: torch.Tensor, spans) -> Future:
        """Put the (offset, bytes) spans of the uint8 CPU tensor `base`, in order, as one chunk, straight
        from `base` (no gather copy first): its spans must not change until the future is done."""
        _check_buf(base)
        h = self.workers.tcp_put_spans(self._client(), key, base.data_ptr(), spans)
        return Future(f"tcp put {key!r} to {self.peer}", parts=[h], keep=[base], nbytes=sum(n for _, n in spans))

    def get(self, key, buf):
        _check_buf(buf)
        h = self.workers.tcp_get(self._client(), key, buf.data_ptr(), buf.numel())
        return Future(f"tcp get {key!r} from {self.peer}", parts=[h], keep=[buf], nbytes=buf.numel())

    def size(self, key):
        raise NotImplementedError("TcpDest.size: ask the server's owner")
