"""The prefix cache below the device: named blocks the device cache evicts are copied to a pinned
host tier (then spilled to a disk tier), and a later admission's hits there are copied back into
its fresh device blocks before its prefill (docs/prefix-caching.md).

Copies are DéjàVuLib's batched block copies (KVStreamer.copy_blocks: every block of a step in one
call, between the cache and HostTier's ranges of one pinned pool). Per step: the evicted blocks go
out (waited for: a hit may be restored into one of them), disk hits are promoted into host ranges,
then every hit goes in with one call that is left running: the engine waits for it just before the
prefill's forward pass (on CUDA the compute stream waits on its event; the host does not).
"""
from __future__ import annotations

import torch

from ..kvstream import KVStreamer, Region
from ..kvstream.futures import Future
from ..kvstream.tiers import DiskTier, HostTier
from .block_manager import PrefixStats
from .kv_cache import PagedKVCache
from .sequence import Sequence


class PrefixTiers:
    def __init__(self, cache: PagedKVCache, stats: PrefixStats, host_bytes: int, disk_dir: str | None = None,
                 disk_bytes: int = 0):
        if host_bytes <= 0:
            raise ValueError("kv offload needs a host tier (kv_offload_bytes > 0): the disk tier is fed from it")
        self.cache, self.stats, self.bs = cache, stats, cache.block_size
        self.streamer = KVStreamer(cache, pool_bytes=4096)  # copies into the tiers' buffers, not its pool
        self.layers = tuple(range(cache.num_layers))
        self.block_bytes = Region.chunks(self.layers, [0]).nbytes(self.streamer.layout)
        self.disk = DiskTier(disk_dir, disk_bytes, self.block_bytes) if disk_dir else None
        self.host = HostTier(host_bytes, self.block_bytes, spill=self.disk, pin=cache.device.type == "cuda")
        self._staging = None  # a pinned block-sized buffer for disk reads the host tier has no room for
        self.pending: Future | None = None  # the last restore, until the engine waited for it

    def lookup(self, names: list[bytes]) -> int:
        """How many of `names`, from the first, the host or disk tier holds."""
        n = 0
        for name in names:
            if name not in self.host and (self.disk is None or name not in self.disk):
                break
            n += 1
        return n

    def sync(self, evicted: list[tuple[int, bytes]], admitted: list[Sequence], overlap: bool = False) -> None:
        """Copy `evicted` device blocks to the host tier, then fill each admitted sequence's
        Sequence.restore blocks from the tiers (advancing its num_cached past each block restored).
        overlap: return once the restore is started, leaving it in `pending` for the caller to wait
        for (wait_pending, or its CUDA event) before the step reads the blocks. The first block that cannot be restored (pushed out meanwhile, a
        failed checksum) ends its sequence's restores: the prefill computes it and all after it."""
        self.wait_pending()  # host ranges read by the last restore may be reused below
        wanted = frozenset(name for s in admitted for _, name in s.restore)
        batch: dict[bytes, int] = {}  # evicted blocks whose host ranges are reserved, not yet copied
        for block, name in evicted:
            if name in self.host and name not in batch:  # the same bytes: just recently used again
                self.host.get(name)
                continue
            if self.host.victim(keep=wanted) in batch:  # it must hold its bytes before it spills
                self._offload(batch)
            if self.host.reserve(name, keep=wanted) is not None:
                batch[name] = block
        self._offload(batch)
        blocks, offsets = [], []
        for s in admitted:
            for block, name in s.restore:
                tier = "host" if name in self.host else "disk"
                if tier == "disk" and not self._promote(name, block, wanted):
                    break
                if tier == "host" or name in self.host:
                    self.host.get(name)
                    blocks.append(block)
                    offsets.append(self.host.offset(name))
                s.num_cached += self.bs
                self.stats.restored_bytes += self.block_bytes
                if tier == "host":
                    self.stats.host_hit_tokens += self.bs
                else:
                    self.stats.disk_hit_tokens += self.bs
            s.restore = []
        if blocks:
            self.pending = self.streamer.copy_blocks(blocks, self.host.pool.storage, offsets, out=False)
            if not overlap:
                self.wait_pending()

    def _offload(self, batch: dict[bytes, int]) -> None:
        """Copy the device blocks of `batch` (name -> block) into their host ranges, one call."""
        if batch:
            offsets = [self.host.offset(name) for name in batch]
            self.streamer.copy_blocks(list(batch.values()), self.host.pool.storage, offsets, out=True).wait()
            self.stats.offloaded_bytes += self.block_bytes * len(batch)
            batch.clear()

    def wait_pending(self) -> None:
        if self.pending is not None:
            f, self.pending = self.pending, None
            f.wait()

    def _promote(self, name: bytes, block: int, wanted: frozenset) -> bool:
        """Read disk block `name` into a host range (it joins the batched restore) or, when the host
        tier has no room beside `wanted`, restore it into `block` through the staging buffer now.
        False when the disk has no valid copy."""
        if self.disk is None or name not in self.disk:
            return False
        buf = self.host.reserve(name, keep=wanted)
        if buf is None:
            if self._staging is None:
                self._staging = torch.empty(self.block_bytes, dtype=torch.uint8,
                                            pin_memory=self.cache.device.type == "cuda")
            ok = self.disk.get(name, self._staging)
            if ok:
                self.streamer.scatter(Region.chunks(self.layers, [block]), self._staging).wait()
        else:
            ok = self.disk.get(name, buf)
            if not ok:
                self.host.drop(name)
        self.stats.disk_corrupt = self.disk.corrupt
        return ok

    def occupancy(self) -> dict:
        out = {"host_blocks": len(self.host), "host_capacity_blocks": self.host.capacity,
               "host_evictions": self.host.evictions, "block_bytes": self.block_bytes}
        if self.disk is not None:
            out.update(disk_blocks=len(self.disk), disk_capacity_blocks=self.disk.capacity,
                       disk_evictions=self.disk.evictions, disk_corrupt=self.disk.corrupt)
        return out
