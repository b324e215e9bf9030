"""DéjàVuLib, the Python face: stream a paged KV cache between GPU memory, host memory, disk and
other workers.

Primitives (as in the paper):
  gather / scatter   a non-contiguous region of the cache <-> one contiguous buffer
  flush / fetch      one contiguous buffer -> / <- a destination (host memory, file, TCP peer, ...)
  stream_out / in    a region to / from a destination: gather + flush, fetch + scatter, pipelined
Routing between workers with different pipeline depths and TP degrees is in routing.py.
Every operation returns a Future (wait / done / error).
"""
from .errors import StreamError
from .futures import Future, gather_futures  # noqa: F401 - public API
from .pool import PinnedPool
from .region import Region
from .streamer import LEVELS, KVStreamer
from .transports import FileDest, HostMemoryDest, TcpDest, TcpReplicaServer

__all__ = ["StreamError", "Future", "PinnedPool", "Region", "KVStreamer", "LEVELS", "HostMemoryDest",
           "FileDest", "TcpDest", "TcpReplicaServer"]
