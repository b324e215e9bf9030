"""The prefix cache below the device: named blocks the device cache evicts are copied to a pinned
host tier (then spilled to a disk tier), and a later admission's hits there are copied back into
its fresh device blocks before its prefill (docs/prefix-caching.md).

Copies are DéjàVuLib's (KVStreamer.gather / scatter of one block's chunks of every layer, into and
out of HostTier's pinned pool ranges); all of a step's copies are issued, then waited for, in this
order: evicted blocks out, hit blocks in (an evicted block may be the target of a hit).
"""
from __future__ import annotations

import torch

from ..kvstream import KVStreamer, Region
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
        self._staging = None  # a pinned block-sized buffer for disk reads

    def lookup(self, names: list[bytes]) -> int:
        """How many of `names`, from the first, the host or disk tier holds."""
        n = 0
        for name in names:
            if name not in self.host and (self.disk is None or name not in self.disk):
                break
            n += 1
        return n

    def sync(self, evicted: list[tuple[int, bytes]], admitted: list[Sequence]) -> None:
        """Copy `evicted` device blocks to the host tier, then fill each admitted sequence's
        Sequence.restore blocks from the tiers, advancing its num_cached past each block restored.
        The first block that cannot be restored (pushed out meanwhile, a failed checksum) ends its
        sequence's restores: the prefill computes it and everything after it."""
        wanted = frozenset(name for s in admitted for _, name in s.restore)
        outs = []
        for block, name in evicted:
            if name in self.host:  # the host copy is the same bytes: just recently used again
                self.host.get(name)
                continue
            buf = self.host.reserve(name, keep=wanted)
            if buf is not None:
                outs.append(self.streamer.gather(Region.chunks(self.layers, [block]), buf))
                self.stats.offloaded_bytes += self.block_bytes
        for f in outs:
            f.wait()
        ins = []
        for s in admitted:
            for block, name in s.restore:
                buf, tier = self.host.get(name), "host"
                if buf is None:
                    buf, tier = self._from_disk(name), "disk"
                if buf is None:
                    break
                f = self.streamer.scatter(Region.chunks(self.layers, [block]), buf)
                if tier == "disk":
                    f.wait()  # the staging buffer is reused by the next disk hit
                else:
                    ins.append(f)
                s.num_cached += self.bs
                self.stats.restored_bytes += self.block_bytes
                if tier == "host":
                    self.stats.host_hit_tokens += self.bs
                else:
                    self.stats.disk_hit_tokens += self.bs
            s.restore = []
        for f in ins:
            f.wait()

    def _from_disk(self, name: bytes) -> torch.Tensor | None:
        if self.disk is None:
            return None
        if self._staging is None:
            self._staging = torch.empty(self.block_bytes, dtype=torch.uint8,
                                        pin_memory=self.cache.device.type == "cuda")
        ok = self.disk.get(name, self._staging)
        self.stats.disk_corrupt = self.disk.corrupt
        return self._staging if ok else None

    def occupancy(self) -> dict:
        out = {"host_blocks": len(self.host), "host_capacity_blocks": self.host.capacity,
               "host_evictions": self.host.evictions, "block_bytes": self.block_bytes}
        if self.disk is not None:
            out.update(disk_blocks=len(self.disk), disk_capacity_blocks=self.disk.capacity,
                       disk_evictions=self.disk.evictions, disk_corrupt=self.disk.corrupt)
        return out
