"""The prefix cache below the device: named blocks the device cache evicts are copied to a pinned
host tier (then spilled to a disk tier), and a later admission's hits there are copied back into
its fresh device blocks before its prefill (docs/prefix-caching.md).

Copies are DéjàVuLib's batched block copies (KVStreamer.copy_blocks: every block of a step in one
call, between the cache and HostTier's ranges of one pinned pool). Per step: the evicted blocks go
out (waited for: a hit may be restored into one of them), disk hits are promoted into host ranges,
then the hits go in with one call per group of layers, left running: the prefill waits for a
group's copy just before its first layer runs (wait_layer; on CUDA the compute stream waits on its
event, the host does not), so restoring later layers overlaps computing earlier ones.

A pipeline's controller keeps an index-only twin (PrefixTiers.index: the same LRU over names, no
bytes) to look names up once; each step carries the operations (`ops`), and every worker applies
them to its own tiers of its layers (`apply`), which hold the same names as the index.
"""
from __future__ import annotations

import os

import torch

from ..kvstream import KVStreamer, Region
from ..kvstream.errors import StreamError
from ..kvstream.futures import Future
from ..kvstream.tiers import HEADER_BYTES, DiskTier, HostTier
from .block_manager import PrefixStats
from .kv_cache import PagedKVCache
from .sequence import Sequence


class PrefixTiers:
    GROUPS = 4  # a restore's copies: one per group of consecutive layers (fewer calls than one per layer)

    def __init__(self, cache: PagedKVCache, stats: PrefixStats, host_bytes: int, disk_dir: str | None = None,
                 disk_bytes: int = 0, host_blocks: int | None = None, disk_blocks: int | None = None,
                 reuse_disk: bool = True):
        """host_blocks / disk_blocks: capacities in blocks (a pipeline worker's, set by its controller)."""
        if host_bytes <= 0 and not host_blocks:
            raise ValueError("kv offload needs a host tier (kv_offload_bytes > 0): the disk tier is fed from it")
        self.cache, self.stats, self.bs = cache, stats, cache.block_size
        self.streamer = KVStreamer(cache, pool_bytes=4096)  # copies into the tiers' buffers, not its pool
        self.layers = tuple(range(cache.num_layers))
        self.layer_bytes = Region.chunks([0], [0]).nbytes(self.streamer.layout)  # one layer of one block
        self.block_bytes = self.layer_bytes * len(self.layers)
        self.disk = (DiskTier(disk_dir, disk_bytes, self.block_bytes, capacity=disk_blocks, reuse=reuse_disk)
                     if disk_dir else None)
        self.host = HostTier(host_bytes, self.block_bytes, spill=self.disk, pin=cache.device.type == "cuda",
                             capacity=host_blocks)
        self._staging = None  # a pinned block-sized buffer for disk reads the host tier has no room for
        # the last restore until waited for: per group of layers, its first layer and its copy
        self.pending: list[tuple[int, Future]] | None = None

    @classmethod
    def index(cls, stats: PrefixStats, block_size: int, block_bytes: int, host_blocks: int,
              disk_blocks: int = 0) -> "PrefixTiers":
        """Names only (a pipeline controller's): lookups and the LRU, no copies. block_bytes: the
        whole model's block (the byte counters)."""
        t = cls.__new__(cls)
        t.cache, t.stats, t.bs, t.streamer, t.block_bytes = None, stats, block_size, None, block_bytes
        t.disk = DiskTier(None, 0, block_bytes, capacity=disk_blocks) if disk_blocks else None
        t.host = HostTier(0, block_bytes, spill=t.disk, capacity=host_blocks, store=False)
        t._staging = t.pending = None
        return t

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
        for (wait_layer, wait_pending) before the step reads the blocks. The first block that cannot
        be restored (pushed out meanwhile, a failed checksum) ends its sequence's restores: the
        prefill computes it and all after it."""
        counts = self.apply(evicted, [s.restore for s in admitted], overlap)
        for s, n in zip(admitted, counts):
            s.num_cached += n * self.bs
            s.restore = []

    def ops(self, evicted: list[tuple[int, bytes]], admitted: list[Sequence]):
        """sync() on the index, and what the workers apply: messages.TierOps, None when nothing moves."""
        from ..cluster.messages import TierOps

        restore = [r for s in admitted for r in s.restore]
        self.sync(evicted, admitted)
        if not evicted and not restore:
            return None
        return TierOps(out_blocks=[b for b, _ in evicted], out_names=[n.hex() for _, n in evicted],
                       in_blocks=[b for b, _ in restore], in_names=[n.hex() for _, n in restore])

    def apply_ops(self, ops, overlap: bool = True) -> None:
        """A pipeline worker's part of a step's TierOps (its controller's index said they all hold)."""
        restore = list(zip(ops.in_blocks, map(bytes.fromhex, ops.in_names)))
        done = self.apply(list(zip(ops.out_blocks, map(bytes.fromhex, ops.out_names))), [restore], overlap)[0]
        if done != len(restore):  # a lost step: the controller resets (every name dropped) and replays
            raise StreamError(f"prefix tiers: {len(restore) - done} of {len(restore)} blocks to restore are gone "
                               f"or failed their checksum here")

    def apply(self, evicted: list[tuple[int, bytes]], restores: list[list[tuple[int, bytes]]],
              overlap: bool = False) -> list[int]:
        """sync()'s copies: how many blocks of each restore list came back."""
        self.wait_pending()  # host ranges read by the last restore may be reused below
        wanted = frozenset(name for r in restores for _, name in r)
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
        blocks, offsets, counts = [], [], []
        for restore in restores:
            n = 0
            for block, name in restore:
                tier = "host" if name in self.host else "disk"
                if tier == "disk" and not self._promote(name, block, wanted):
                    break
                if tier == "host" or name in self.host:
                    self.host.get(name)
                    blocks.append(block)
                    offsets.append(self.host.offset(name))
                n += 1
                self.stats.restored_bytes += self.block_bytes
                if tier == "host":
                    self.stats.host_hit_tokens += self.bs
                else:
                    self.stats.disk_hit_tokens += self.bs
            counts.append(n)
        if blocks and self.streamer is not None:
            # one batched copy per group of layers: the prefill waits for each just before its first layer
            n = len(self.layers)
            cuts = sorted({n * g // min(self.GROUPS, n) for g in range(min(self.GROUPS, n))}) + [n]
            self.pending = [(a, self.streamer.copy_blocks(blocks, self.host.pool.storage,
                                                          [o + a * self.layer_bytes for o in offsets], out=False,
                                                          layers=self.layers[a:b]))
                            for a, b in zip(cuts, cuts[1:])]
            if not overlap:
                self.wait_pending()
        return counts

    def _offload(self, batch: dict[bytes, int]) -> None:
        """Copy the device blocks of `batch` (name -> block) into their host ranges, one call."""
        if batch:
            offsets = [self.host.offset(name) for name in batch]
            if self.streamer is not None:
                self.streamer.copy_blocks(list(batch.values()), self.host.pool.storage, offsets, out=True).wait()
            self.stats.offloaded_bytes += self.block_bytes * len(batch)
            batch.clear()

    def wait_pending(self) -> None:
        if self.pending is not None:
            fs, self.pending = self.pending, None
            for _, f in fs:
                f.wait()

    def wait_layer(self, i: int) -> None:
        """The step reading the restored blocks is about to run local layer i: wait for the copy of
        the group of layers it starts, if any (on CUDA the current stream waits on its event and the
        host goes on; the next apply() waits for all of them on the host before reusing their host ranges)."""
        f = next((f for a, f in self.pending or () if a == i), None)
        if f is None:  # no restore pending, or layer i starts no group
            return
        if f.event is not None:
            torch.cuda.current_stream(self.cache.device).wait_event(f.event)
        else:
            f.wait()

    def reset(self) -> None:
        """Forget every block of both tiers (a pipeline's recovery drops every name)."""
        self.wait_pending()
        self.host.clear()
        if self.disk is not None:
            self.disk.clear()

    def _promote(self, name: bytes, block: int, wanted: frozenset) -> bool:
        """Read disk block `name` into a host range (it joins the batched restore) or, when the host
        tier has no room beside `wanted`, restore it into `block` through the staging buffer now.
        False when the disk has no valid copy."""
        if self.disk is None or name not in self.disk:
            return False
        buf = self.host.reserve(name, keep=wanted)
        if self.streamer is None:  # an index: the workers read and check the bytes
            return self.disk.get(name, buf)
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

    def tier_occupancy(self) -> dict:
        """{tier: {"blocks", "capacity_blocks"}} of host (and disk) (/v1/cluster, /metrics)."""
        out = {"host": {"blocks": len(self.host), "capacity_blocks": self.host.capacity}}
        if self.disk is not None:
            out["disk"] = {"blocks": len(self.disk), "capacity_blocks": self.disk.capacity}
        return out

    def occupancy(self) -> dict:
        out = {"host_blocks": len(self.host), "host_capacity_blocks": self.host.capacity,
               "host_evictions": self.host.evictions, "block_bytes": self.block_bytes}
        if self.disk is not None:
            out.update(disk_blocks=len(self.disk), disk_capacity_blocks=self.disk.capacity,
                       disk_evictions=self.disk.evictions, disk_corrupt=self.disk.corrupt)
        return out


def pipeline_tiers(config, stats: PrefixStats, block_size: int, stage_block_bytes: int, model_block_bytes: int):
    """A pipeline's tiers: (the controller's index, the OffloadConfig of a worker named w), or
    (None, None) without them. Capacities are in blocks of the deepest stage (`stage_block_bytes`,
    one worker's), so every worker holds the same names as the index."""
    from ..cluster.messages import OffloadConfig

    if not (config.enable_prefix_caching and config.kv_offload_bytes):
        return None, None
    host = config.kv_offload_bytes // stage_block_bytes
    if host <= 0:
        raise ValueError(f"kv_offload_gib={config.kv_offload_gib} cannot hold one {stage_block_bytes}-byte KV block "
                         f"of a stage")
    disk = config.kv_offload_dir_bytes // (HEADER_BYTES + stage_block_bytes) if config.kv_offload_dir else 0
    if config.kv_offload_dir and disk <= 0:
        raise ValueError(f"kv_offload_dir_gib={config.kv_offload_dir_gib} cannot hold one block file")
    index = PrefixTiers.index(stats, block_size, model_block_bytes, host, disk)
    d = config.kv_offload_dir
    return index, lambda w: OffloadConfig(host_blocks=host, disk_dir=d and os.path.join(d, w), disk_blocks=disk)
