"""The controller's side of microbatch swapping (`swap`, `resident_microbatches` k).

The decode workers' device cache holds k microbatches' regions; each microbatch slot has a region's
worth of logical blocks of its own, and all of them live in the workers' pinned host copies, from
where a slot's region is swapped in for its steps (engine/swap.py is the worker's side). A step
lists every block its microbatch holds (`live`), so workers keep exactly those resident.
"""
from __future__ import annotations

from ..engine.block_manager import BlockAllocator
from .messages import SwapConfig


class SwapRegions:
    exports = ("swap", "region_blocks", "device_blocks", "host_blocks")  # read through the controller

    def __init__(self, resident: int):
        self.swap = resident  # microbatches resident on the device; 0: no swapping

    def allocators(self, num_blocks: int, slots: int, shared: BlockAllocator) -> list[BlockAllocator]:
        """The block allocator of each of `slots` microbatch slots: `shared`; or with swapping, where
        the device budget (num_blocks) holds `swap` microbatches, a region's worth of logical blocks
        of each slot's own."""
        if not self.swap:
            return [shared] * slots
        k = min(self.swap, slots)
        self.region_blocks = num_blocks // k
        if self.region_blocks <= 0:
            raise ValueError(f"{num_blocks} KV blocks cannot hold {k} resident microbatches")
        self.device_blocks, self.host_blocks, self.swap = self.region_blocks * k, self.region_blocks * slots, k
        return [BlockAllocator(self.region_blocks, first=i * self.region_blocks) for i in range(slots)]

    def config(self, rc: dict) -> dict:
        """A decode worker's config, with its device cache and host copy sizes when swapping."""
        if self.swap:
            rc.update(num_blocks=self.device_blocks, swap=SwapConfig(resident=self.swap, host_blocks=self.host_blocks))
        return rc

    def live(self, running) -> list[int] | None:
        """With swapping, every block a microbatch's `running` sequences hold (a block shared by
        several of them once: it is swapped once)."""
        return list(dict.fromkeys(b for s in running for b in s.block_table)) if self.swap else None
