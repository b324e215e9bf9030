"""Restoring a replica within a host through shared memory (docs/fault-tolerance.md, Restore KV).

The replacement creates a /dev/shm segment of exactly the size of the blocks it fetches (named
after its own pid and the deployment's tag: `cleanup_orphans` removes it if the replacement dies)
and asks its holder, over the authenticated replica connection, to gather the blocks into it. The
holder's C++ mirror writes straight into the segment (DéjàVuLib's host gather, no interpreter
lock) and only the slot checksums come back in the reply: no KV byte crosses a socket. On CUDA the
segment is registered as pinned memory before the holder fills it (which also faults its pages in
once), and the blocks go into the cache with the copy engine, one 2-D copy per run of
consecutive block ids per layer (region.dma_copy_blocks, as swapping does).
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import re

import torch

from .auth import cluster_tag
from .mirror import ReplicaError, _private_file
from .region import dma_copy_blocks
from .shm import SHM_DIR, owner_prefix

log = logging.getLogger("dejavu.kvstream")


def _map(fd: int, nbytes: int) -> torch.Tensor:
    """The first nbytes of the file as a uint8 tensor, its page tables filled at once
    (MAP_POPULATE: one pass in the kernel rather than a fault per page). Unmapped when the last
    tensor over it goes."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return torch.frombuffer(mmap.mmap(fd, nbytes, flags=flags), dtype=torch.uint8)


_NAME = re.compile(r"dejavu-\d+-([0-9a-f]{12})-restore-[A-Za-z0-9_.-]{1,128}")


class RestoreSegment:
    """The replacement's side: a private segment of `nbytes` (`name` goes in the get_blocks
    request), mapped here as `tensor` (uint8); the holder fills its first `used` bytes, `data`. A
    standby makes one ahead of time, as large as the cache it may restore, and faults it in
    (`prefault`), so a restore spends nothing on page faults."""

    def __init__(self, token: str, src: str, nbytes: int):
        self.used = nbytes
        self.name = owner_prefix(cluster_tag(token)) + f"restore-{src}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self.tensor = _map(fd, nbytes)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.pinned = False

    @property
    def data(self) -> torch.Tensor:
        return self.tensor[:self.used]

    def prefault(self) -> None:
        """Fault every page in now: pinned for the copy engine where CUDA exists, else touched."""
        if not self.pin():
            self.tensor.zero_()

    def pin(self) -> bool:
        """Register the mapping as pinned memory for the copy engine (faults its pages in)."""
        if self.tensor.numel() and torch.cuda.is_available():
            rt = torch.cuda.cudart()
            self.pinned = rt.cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), 0) == rt.cudaError.success
        return self.pinned

    def close(self) -> None:
        if self.tensor is None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.tensor = None  # the mapping goes with the last reference


def new_segment(token: str, src: str, nbytes: int, instead: str) -> RestoreSegment | None:
    """A new RestoreSegment, or None where shared memory cannot hold one (a warning says what is
    done `instead`)."""
    try:
        return RestoreSegment(token, src, nbytes)
    except OSError as e:
        log.warning("no restore segment (%s): %s", e, instead)
        return None


def fill(mirror, hdr: dict, token: str):
    """The holder's side of a get_blocks naming a segment: the blocks gathered into it; the reply
    carries their slot checksums. The segment must be one of this deployment's restore segments,
    a regular file of this user, at least as large as the blocks."""
    name, blocks = hdr["shm"], list(hdr["blocks"])
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None or m.group(1) != cluster_tag(token):
        raise ReplicaError(f"bad restore segment name {name!r}")
    shape = (mirror.shape[0], len(blocks)) + mirror.shape[2:]
    try:
        fd = _private_file(os.path.join(SHM_DIR, name), create=False)
    except OSError as e:
        raise ReplicaError(f"restore segment {name}: {e.strerror}") from None
    try:
        nbytes = math.prod(shape) * mirror.dtype.itemsize
        if os.fstat(fd).st_size < nbytes:
            raise ReplicaError(f"restore segment {name} is not a segment of ours of at least {nbytes} bytes")
        out = _map(fd, nbytes).view(mirror.dtype).view(shape)
    finally:
        os.close(fd)
    _, chk = mirror.get_blocks(blocks, out=out)
    return {"t": "data", "chk": chk.numpy().tobytes()}, None


def to_cache(x: torch.Tensor, cache: torch.Tensor, blocks: list[int], pinned: bool) -> None:
    """Packed blocks x [layers, n, ...] into cache[:, blocks]: the copy engine from pinned memory
    on CUDA, else index_copy_."""
    from .. import _C

    if cache.device.type == "cuda" and pinned and _C.cuda_compiled():
        with torch.cuda.device(cache.device):
            stream = torch.cuda.current_stream(cache.device)
            dma_copy_blocks(x, cache, list(range(x.shape[1])), blocks, stream)
            stream.synchronize()
        return
    idx = torch.as_tensor(blocks, dtype=torch.long, device=cache.device)
    cache.index_copy_(1, idx, x.to(cache.device))
