"""The FasterTransformer-style pipeline as a placement policy.

D = pp stages, each tp worker processes holding a contiguous layer range (routing.split_layers,
overridable) split tensor-parallel: column-parallel projections hold a slice of the heads / MLP
width, row-parallel ones sum over the stage's TP group (gloo on CPU, NCCL across GPUs). Every
worker is a stage of the one pipeline; its D microbatch slots admit from the controller's queue
and run both prefills and decode steps (continuous batching, up to `microbatch_size` sequences).
"""
from __future__ import annotations

from ...kvstream.routing import split_layers
from . import PlacementPolicy, check_split


class PipelinePolicy(PlacementPolicy):
    exports: tuple[str, ...] = ()
    prefills_in_slots = True

    def __init__(self, pp: int, layer_split: list[tuple[int, int]] | None = None, microbatch_size: int = 0):
        self.depth, self.layer_split, self.microbatch_size = pp, layer_split, microbatch_size

    def plan(self, c) -> None:
        self.c = c
        layers = self.layer_split or split_layers(c.model_config.num_layers, self.depth)
        check_split(layers, self.depth, c.model_config.num_layers)
        c.world = self.depth * c.tp
        c.decode_pipeline(layers, self.microbatch_size or c.config.max_num_seqs, c.waiting, c.config.admission)
        self._slot_tiers()

    def _slot_tiers(self) -> None:
        """Prefix caching's host and disk tiers: names at the controller (an index, looked up once),
        each worker's layers' bytes in its own tiers, which every step's TierOps keep holding the same names."""
        c = self.c
        # (with swapping every slot's allocator names its own logical blocks: one index serves them all,
        # its counters go with the first slot's, which prefix_cache_stats sums with the others)
        self.plan_tiers(c.slots[0].allocator.stats, c.layers)
        for slot in c.slots:
            slot.allocator.record_evictions = c.tiers is not None
            slot.tiers = c.tiers

    def rank_config(self, rank: int) -> dict:
        c = self.c
        name = f"s{rank // c.tp}.{rank % c.tp}"
        return c.regions.config({"role": "stage", "pp": c.pp, "layers": [list(x) for x in c.layers], "first_rank": 0,
                                 "num_blocks": c.num_blocks, "worker_name": name,
                                 "kv_offload": self.offload_config and self.offload_config(name)})

    def step_ranks(self):
        return range(self.c.world)

    def stalled(self) -> bool:
        return bool(self.c.waiting)

    def stats_allocators(self) -> list:
        return self.c._named_allocators()
