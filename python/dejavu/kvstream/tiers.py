"""Lower tiers of a prefix cache: bounded LRU stores of fixed-size KV blocks keyed by name.

HostTier keeps each block in a range of DéjàVuLib's pinned pool; DiskTier keeps each in a file
with a header and a checksum. Both know nothing of models: a block is `block_bytes` opaque bytes
(a block's chunks of every layer, as KVStreamer.gather packs a one-block region).

Without storage (HostTier(store=False), DiskTier(None, ...)) a tier is an index only: the same LRU
over names, no bytes. A pipeline's controller keeps one to look names up once for every stage,
whose workers hold the bytes and, applying the same operations, the same names
(engine/prefix_tiers.py).
"""
from __future__ import annotations

import os
import struct
import zlib
from collections import OrderedDict

import torch

from .pool import PinnedPool, PoolBuffer

_MAGIC = b"DJVKVB01"
_HEADER = struct.Struct("<8sQI")  # magic, payload bytes, crc32 of the payload
HEADER_BYTES = _HEADER.size  # a block file's bytes besides the block
_NO_BYTES = torch.empty(0, dtype=torch.uint8)  # what an index-only tier hands out for a block


class HostTier:
    """Up to capacity_bytes // block_bytes blocks in pinned host memory, least recently used out
    first; a block pushed out goes to `spill` (a DiskTier) when there is one."""

    def __init__(self, capacity_bytes: int, block_bytes: int, spill: "DiskTier | None" = None, pin: bool | None = None,
                 capacity: int | None = None, store: bool = True):
        """capacity: blocks (instead of capacity_bytes // block_bytes); store False: an index only."""
        self.block_bytes = block_bytes
        self.capacity = capacity_bytes // block_bytes if capacity is None else capacity
        if self.capacity <= 0:
            raise ValueError(f"a host tier of {capacity_bytes} bytes cannot hold one {block_bytes}-byte KV block")
        self.pool = (PinnedPool(self.capacity * -(-block_bytes // 256) * 256 + 256, pin=pin)  # 256-byte aligned ranges
                     if store else None)
        self.entries: OrderedDict[bytes, PoolBuffer | None] = OrderedDict()
        self.spill = spill
        self.evictions = 0

    def __contains__(self, name: bytes) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: bytes) -> torch.Tensor | None:
        """The block's bytes (a view of the pool; valid until it is evicted), marked recently used."""
        if name not in self.entries:
            return None
        self.entries.move_to_end(name)
        buf = self.entries[name]
        return buf.tensor if buf is not None else _NO_BYTES

    def offset(self, name: bytes) -> int:
        """Where block `name` starts in `pool.storage` (batched copies address every block in it)."""
        buf = self.entries[name]
        return buf.offset if buf is not None else 0

    def victim(self, keep=frozenset()) -> bytes | None:
        """The block the next reserve() of a new name pushes out (None: there is room, or all kept)."""
        if len(self.entries) < self.capacity:
            return None
        return next((n for n in self.entries if n not in keep), None)

    def reserve(self, name: bytes, keep=frozenset()) -> torch.Tensor | None:
        """A pool range to copy block `name` into (None when every entry is in `keep`)."""
        if name in self.entries:
            return self.get(name)
        while len(self.entries) >= self.capacity:
            victim = self.victim(keep)
            if victim is None:
                return None
            self._evict(victim, keep)
        buf = self.pool.alloc(self.block_bytes) if self.pool is not None else None
        self.entries[name] = buf
        return buf.tensor if buf is not None else _NO_BYTES

    def drop(self, name: bytes) -> None:
        """Forget block `name` without spilling it (its range never got valid bytes)."""
        buf = self.entries.pop(name)
        if buf is not None:
            buf.free()

    def clear(self) -> None:
        """Forget every block (without spilling)."""
        for name in list(self.entries):
            self.drop(name)

    def _evict(self, name: bytes, keep=frozenset()) -> None:
        buf = self.entries.pop(name)
        if self.spill is not None:
            self.spill.put(name, buf.tensor if buf is not None else _NO_BYTES, keep)
        if buf is not None:
            buf.free()
        self.evictions += 1


class DiskTier:
    """Blocks in files under `directory` (one per block, named by the block's name), at most
    capacity_bytes of them, least recently used out first. A file whose size, header or checksum
    is wrong is deleted and reported as missing: the block is recomputed, never used. Files left
    by an earlier run are indexed at start (names include the model identity), or deleted with
    reuse=False (a pipeline worker's: the controller's index does not know them). directory None:
    an index only (every block it holds reads as valid)."""

    def __init__(self, directory: str | None, capacity_bytes: int, block_bytes: int, capacity: int | None = None,
                 reuse: bool = True):
        self.dir, self.block_bytes = directory, block_bytes
        self.file_bytes = _HEADER.size + block_bytes
        self.capacity = capacity_bytes // self.file_bytes if capacity is None else capacity
        if self.capacity <= 0:
            raise ValueError(f"a disk tier of {capacity_bytes} bytes cannot hold one {self.file_bytes}-byte block file")
        self.entries: OrderedDict[bytes, None] = OrderedDict()
        self.corrupt = self.evictions = 0
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        found = []
        for f in os.listdir(directory):
            if f.endswith(".kv") and len(f) == 35:
                try:
                    name = bytes.fromhex(f[:-3])
                    found.append((os.stat(os.path.join(directory, f)).st_mtime_ns, name))
                except (ValueError, OSError):
                    continue
        for _, name in sorted(found):
            self.entries[name] = None
        if not reuse:
            self.clear()
        self._trim()

    def path(self, name: bytes) -> str:
        return os.path.join(self.dir, name.hex() + ".kv")

    def __contains__(self, name: bytes) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, name: bytes, data: torch.Tensor, keep=frozenset()) -> None:
        if name in self.entries:
            self.entries.move_to_end(name)
            return
        if self.dir is None:
            self.entries[name] = None
            self._trim(keep)
            return
        payload = data.numpy().tobytes()
        tmp = self.path(name) + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)))
            f.write(payload)
        os.replace(tmp, self.path(name))  # a reader never sees half a file
        self.entries[name] = None
        self._trim(keep)

    def _trim(self, keep=frozenset()) -> None:
        while len(self.entries) > self.capacity:
            victim = next((n for n in self.entries if n not in keep), None)
            if victim is None:
                return
            self._drop(victim)
            self.evictions += 1

    def clear(self) -> None:
        """Forget (and delete) every block."""
        for name in list(self.entries):
            self._drop(name)

    def _drop(self, name: bytes) -> None:
        self.entries.pop(name, None)
        if self.dir is None:
            return
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def get(self, name: bytes, out: torch.Tensor) -> bool:
        """Read block `name` into the uint8 tensor `out`; False (and the file removed) when it is
        missing or fails its checks."""
        if name not in self.entries:
            return False
        if self.dir is None:
            self.entries.move_to_end(name)
            return True
        try:
            with open(self.path(name), "rb") as f:
                raw = f.read(self.file_bytes + 1)
        except OSError:
            self._drop(name)
            return False
        ok = len(raw) == self.file_bytes
        if ok:
            magic, n, crc = _HEADER.unpack_from(raw)
            payload = memoryview(raw)[_HEADER.size:]
            ok = magic == _MAGIC and n == self.block_bytes and zlib.crc32(payload) == crc
        if not ok:
            self.corrupt += 1
            self._drop(name)
            return False
        out.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.entries.move_to_end(name)
        return True
