"""The controller's view of prefix caching: the allocators that name blocks (the decode slots' and
the policy's), their counters and occupancy with the pipeline's host and disk tiers, and each
pipeline step's tier copies."""
from __future__ import annotations

import dataclasses

from ..engine.block_manager import BlockAllocator, PrefixStats


class PrefixCacheView:
    """Mixed into cluster.controller.Controller (its slots, policy, prefix_salt and tiers)."""
    tiers = None  # prefix caching's host/disk tiers: the index (a pipeline policy's plan sets it)

    def _named_allocators(self) -> list[BlockAllocator]:
        """The allocators that name blocks: the shared one (or each slot's own when swapping), and
        the policy's (the prompt side's)."""
        return list({id(s.allocator): s.allocator for s in self.slots}.values()) + self.policy.named_allocators()

    def reset_prefix_cache(self, tiers: bool = True) -> None:
        """Forget every block name (a worker was replaced, or blocks have no replica). tiers=False:
        only the device's (the host and disk tiers' stay: a step restoring a block replicates it)."""
        for a in self._named_allocators():
            a.reset_prefix_cache()
        if tiers and self.tiers is not None:  # (each worker forgets its own at the recovery's reset)
            self.tiers.reset()

    def prefix_cache_stats(self) -> dict | None:
        """Prefix-cache counters summed over the allocators the policy counts (no host or disk tier)."""
        if self.prefix_salt is None:
            return None
        total = PrefixStats()
        for a in self.policy.stats_allocators():
            for f in dataclasses.fields(PrefixStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(a.stats, f.name))
        return {**total.as_dict(), **(self.tiers.occupancy() if self.tiers is not None else {})}

    def prefix_cache_tiers(self) -> dict | None:
        """The device tier's named blocks and capacity over every allocator (/v1/cluster, /metrics)."""
        if self.prefix_salt is None:
            return None
        allocs = self._named_allocators()
        return {"device": {"blocks": sum(a.num_named for a in allocs), "capacity_blocks": sum(a.num_blocks for a in allocs)},
                **(self.tiers.tier_occupancy() if self.tiers is not None else {})}

    def _tier_ops(self, slot, seqs, is_prefill: bool):
        """A pipeline step: each sequence's KV before it (a lost step rewinds there), and the prefix
        tiers' copies every worker makes before it (TierOps, or None)."""
        for s in seqs:
            s.step_start = s.num_cached
        return self.tiers and self.tiers.ops(slot.allocator.take_evicted(), seqs if is_prefill else [])
