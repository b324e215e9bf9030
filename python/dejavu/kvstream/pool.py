"""The pinned host memory pool: one buffer registered once (page-locked when CUDA is present),
carved into ranges by the C++ allocator and reused; a clear error when it is full."""
from __future__ import annotations

import torch

from .. import _C


class PoolBuffer:
    """A range of the pool, as a uint8 tensor view; give it back with free()."""

    def __init__(self, pool: "PinnedPool", offset: int, nbytes: int):
        self.pool, self.offset, self.nbytes = pool, offset, nbytes
        self.tensor = pool.storage[offset:offset + nbytes]

    def free(self) -> None:
        if self.pool is not None:
            self.pool.allocator.free(self.offset)
            self.pool = None


class PinnedPool:
    def __init__(self, nbytes: int, pin: bool | None = None):
        if nbytes <= 0:
            raise ValueError(f"pinned pool size must be > 0, got {nbytes}")
        if pin is None:
            pin = torch.cuda.is_available()
        self.pinned = bool(pin)
        self.storage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.allocator = _C.HostPool(nbytes, 256)

    def alloc(self, nbytes: int) -> PoolBuffer:
        """Raises _C.PoolFull (a MemoryError) naming the sizes when the pool cannot hold nbytes."""
        return PoolBuffer(self, self.allocator.allocate(nbytes), nbytes)

    @property
    def used(self) -> int:
        return self.allocator.used

    @property
    def capacity(self) -> int:
        return self.allocator.capacity
