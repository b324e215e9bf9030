"""Placement policies: which rank plays what, and how requests reach the decode pipeline.

The controller (cluster/controller.py) is the same for every deployment; a policy is the part that
differs. `PipelinePolicy` (pipeline.py) is the FasterTransformer-style pipeline: every worker is a
stage of one pipeline that prefills and decodes in its microbatch slots. `DisaggPolicy` (disagg.py)
is prompt-token disaggregation: a prompt pipeline prefills and streams the KV to a token pipeline,
which only decodes. A new policy is a module here with the methods of `PlacementPolicy`, chosen in
llm.py.
"""
from __future__ import annotations

def check_split(layers, depth: int, num_layers: int) -> None:
    """A layer split must be `depth` contiguous, non-empty ranges covering the model's layers."""
    if len(layers) != depth:
        raise ValueError(f"layer split has {len(layers)} stages but the depth is {depth}")
    expect = 0
    for a, b in layers:
        if a != expect or b <= a:
            raise ValueError(f"layer split {layers} must be contiguous, non-empty ranges from 0")
        expect = b
    if expect != num_layers:
        raise ValueError(f"layer split {layers} does not end at the model's {num_layers} layers")


class PlacementPolicy:
    """What the controller asks of a policy (`c` below is the controller). The defaults are those of
    a policy that holds no requests of its own (every request goes through the decode slots)."""
    exports: tuple[str, ...]   # the policy's state callers read through the controller
    prefills_in_slots: bool    # the decode pipeline's microbatch slots also run prefills

    def plan(self, c) -> None:
        """Lay out the workers: c.world, and the decode pipeline (c.decode_pipeline)."""
        raise NotImplementedError

    def rank_config(self, rank: int) -> dict:
        """The rank's part of its Config: role, pp, layers, first_rank, num_blocks, worker_name."""
        raise NotImplementedError

    def step_ranks(self):
        """The ranks the decode pipeline's steps go to."""
        raise NotImplementedError

    def stalled(self) -> bool:
        """Nothing runs and requests wait that nothing can ever run."""
        raise NotImplementedError

    def stats_allocators(self) -> list:
        """The allocators whose prefix-cache counters the deployment reports."""
        raise NotImplementedError

    def plan_tiers(self, stats, layers):
        """Prefix caching's host and disk tiers of the workers of a pipeline over `layers`: sets
        c.tiers (the controller's index of names, counting into `stats`; None without tiers) and
        offload_config(worker_name) (that worker's messages.OffloadConfig); returns c.tiers."""
        from ...engine.kv_cache import PagedKVCache
        from ...engine.prefix_tiers import pipeline_tiers

        c, cfg = self.c, self.c.model_config
        model_block = PagedKVCache.bytes_per_block(cfg.num_layers, c.block_size, cfg.num_kv_heads, cfg.head_dim, c.dtype)
        c.tiers, self.offload_config = pipeline_tiers(c.config, stats, c.block_size, c.block_bytes(layers), model_block)
        return c.tiers

    def after_ready(self) -> None:
        """Every worker is up: introduce them to each other where the policy needs it."""

    def after_recovery(self, dead: set[int]) -> None:
        """Replacements for `dead` are up: introduce them."""

    def check_request(self, seq) -> None:
        """Raise RequestError when the policy cannot ever run `seq`."""

    def feed(self) -> None:
        """Before the slots schedule: the policy's own work (prefills out, requests into slots)."""

    def in_flight(self) -> bool:
        """Work of the policy's own is running on workers."""
        return False

    def on_message(self, msg) -> list:
        """A worker's message other than a step's tokens; returns the requests it advanced."""
        return []

    def has_unfinished(self) -> bool:
        """Requests the policy holds outside the controller's queue and slots."""
        return False

    def finish(self, seq, reason: str) -> bool:
        """End `seq`, which is in no microbatch slot; False: the controller's scheduler does."""
        return False

    def admitted(self) -> list:
        """Requests whose KV is in the decode caches but that are in no slot yet."""
        return []

    def abandon(self) -> list[str]:
        """A recovery: the policy's work in flight is lost; returns KV keys workers drop."""
        return []

    def stop(self) -> list:
        """Stopping: empty the policy's queues into c.waiting; returns the requests only it held."""
        return []

    def named_allocators(self) -> list:
        """Allocators beside the decode pipeline's that name blocks (prefix caching)."""
        return []

    def close(self) -> None:
        """The deployment shut down."""
