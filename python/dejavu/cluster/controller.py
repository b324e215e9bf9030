"""The controller of a distributed deployment: the LLMEngine face, assembled from parts.

A placement policy (cluster/policies/: the FT pipeline, or prompt-token disaggregation) decides
which rank plays what and how requests reach the decode pipeline. Everything else is the same for
both and lives in its own part: Launcher (processes), Membership (who is where, the inbox,
heartbeats), Dispatch (microbatch steps out, tokens back), Replication (watermarks), Recovery, and
the swap regions below. The decode pipeline has one microbatch slot per stage: each slot has its
own scheduler (continuous batching, up to a microbatch of sequences) over one shared queue and one
shared block allocator (every stage's cache uses the same block ids for its own layers). A slot's
next step is sent as soon as its previous step's tokens are back.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from ..engine.block_manager import BlockAllocator
from ..engine.kv_cache import PagedKVCache
from ..engine.llm_engine import EngineConfig, LLMEngine, eos_ids, prefix_salt
from ..engine.scheduler import Scheduler
from ..engine.sequence import Sequence, Status
from ..models.loader import ModelSource, model_identity
from ..models.tp import check as tp_check
from . import adopt, health
from .dispatch import Dispatch
from .prefix_view import PrefixCacheView
from .launch import Launcher
from .membership import Membership
from .recovery import Failure, Recovery, Stopped, recovery_policy
from .replication import Replication
from .swap_regions import SwapRegions


class Controller(PrefixCacheView, LLMEngine):
    def __init__(self, source: ModelSource, tokenizer, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, seed: int, policy, tp: int = 1, launcher: str = "local", timeout: float = 300.0,
                 hostfile: str | None = None, log_dir: str | None = None, swap: bool = False,
                 resident_microbatches: int = 2, replicate: bool = False, replicate_dir: str | None = None,
                 replicate_to: list[int] | None = None, recovery: str = "auto", heartbeat_interval: float = 0.5,
                 heartbeat_timeout: float = 2.0, spare_workers: int = 1, cluster_address: str | None = None,
                 replicas: int = 1, standby_weights: str = "host"):
        cfg = self.model_config = source.config
        self.model = None
        self.tokenizer, self.config, self.device, self.dtype = tokenizer, config, device, dtype
        self.tp = tp
        tp_check(cfg, tp)  # raises ModelError now if tp does not divide the heads or the MLP
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        self.block_size = config.block_size
        self.eos_ids = eos_ids(cfg, tokenizer)
        self.num_generated = 0
        self.timeout = timeout
        self._closed = False
        self._stopping = False  # begin_stop(): no worker exit is a failure any more
        self.regions = SwapRegions(resident_microbatches if swap else 0)
        self.swap_stats: dict[int, dict] = {}  # per worker: bytes in/out, seconds waiting for swap-ins
        self.peak_running = 0                  # most sequences running at once (bench swap)
        # The sampling stage's decode steps (seconds; bench replication overhead): the latest ones,
        # and totals for /metrics.
        self.decode_steps: deque[float] = deque(maxlen=1 << 16)
        self.decode_step_totals = [0, 0.0]
        # prefix caching: blocks named here once for every stage (each caches its own layers' K/V)
        self.prefix_salt = (prefix_salt(model_identity(source, seed), dtype, 0, cfg.num_layers)
                            if config.enable_prefix_caching else None)
        self.waiting: deque[Sequence] = deque()  # requests waiting for their prefill
        self.policy = policy
        policy.plan(self)  # world; the decode pipeline (decode_pipeline): pp, layers, blocks, slots
        self.scheduler = self.slots[0]  # for code that asks for "the" scheduler (counts, preemptions)
        rec = recovery_policy(recovery, launcher, replicate)
        self.ft = rec != "off"
        self.recovery = Recovery(self, rec, spare_workers, standby_weights)
        # the stages that hold decode KV: the pipeline, or the token pipeline
        self.replication = Replication(replicate, self.pp, replicate_to, replicate_dir, replicas)
        self.dispatch = Dispatch(self, len(self.slots))
        self.members = Membership(self, cluster_address, heartbeat_interval, heartbeat_timeout)
        self._share_members()
        self.log_dir = log_dir
        self.launcher = Launcher(self.controller_addr, self.token, device.type, log_dir)
        if not adopt.pending():
            self.launcher.start(launcher, self.world, hostfile, recovery=self.ft)
        try:
            self.members.rendezvous(source.spec, device, dtype, seed)  # (or its live workers rejoin: adopt.py)
        except BaseException:
            self.shutdown()
            raise

    def __getattr__(self, name: str):
        """The parts' state that callers read: the swap regions' sizes, the policy's own
        (disaggregation: prompt_alloc, kv_bytes, ...)."""
        for key in ("regions", "policy"):
            part = self.__dict__.get(key)
            if part is not None and name in part.exports and hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _share_members(self) -> None:
        """The membership's state and calls under the names recovery.py and callers read."""
        m = self.members
        self.token, self.port, self.controller_addr = m.token, m.port, m.controller_addr
        self.channels, self.worker_info, self._ipc = m.channels, m.worker_info, m.ipc
        self._gen, self._last_seen, self._needed, self._standbys, self._fenced = (m.gen, m.last_seen, m.needed,
                                                                                  m.standbys, m.fenced)
        self._place, self._config_for, self._start_reader, self._on_ready = (m.place, m.config_for, m.start_reader,
                                                                             m.on_ready)
        self._next_message, self._pipes_msg, self.address = m.next_message, m.pipes_msg, m.address

    @property
    def _epoch(self) -> int:
        return self.members.epoch

    @_epoch.setter
    def _epoch(self, epoch: int) -> None:
        self.members.epoch = epoch

    # ------------------------------------------------------------------ layout (the policy's plan uses these)
    def block_bytes(self, layers) -> int:
        """Bytes of one KV block on a worker of the deepest stage of a pipeline over `layers`."""
        cfg = self.model_config
        return PagedKVCache.bytes_per_block(max(b - a for a, b in layers), self.block_size, cfg.num_kv_heads // self.tp,
                                            cfg.head_dim, self.dtype)

    def blocks_for(self, layers) -> int:
        """KV blocks per worker of a pipeline over `layers`: given, or what the memory budget holds
        on its deepest stage."""
        return self.config.num_blocks or max(1, self.config.kv_cache_memory // self.block_bytes(layers))

    def decode_pipeline(self, layers, microbatch: int, queue: deque, admission: str = "greedy") -> None:
        """The pipeline that decodes: its stages' layer ranges, its KV blocks per worker, the shared
        allocator, and one microbatch slot per stage admitting from `queue` up to `microbatch`
        sequences."""
        self.layers, self.pp = layers, len(layers)
        self.num_blocks = self.blocks_for(layers)
        self.allocator = BlockAllocator(self.num_blocks)
        allocs = self.regions.allocators(self.num_blocks, self.pp, self.allocator)
        if self.swap:
            self.num_blocks = self.region_blocks  # what one microbatch (so one request) can hold
        self.slots = [Scheduler(a, self.block_size, microbatch, self.config.max_num_batched_tokens, queue, admission,
                                self.prefix_salt) for a in allocs]

    # the layout as membership.py, dispatch.py and recovery.py ask for it
    def _rank_config(self, rank: int) -> dict:
        return self.policy.rank_config(rank)

    def _step_ranks(self):
        """The workers that run the decode pipeline's microbatch steps."""
        return self.policy.step_ranks()

    def _tp_groups(self) -> list[list[int]]:
        return [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.world // self.tp)]

    def _after_ready(self) -> None:
        self.policy.after_ready()

    def _after_recovery(self, dead: set[int]) -> None:
        self.policy.after_recovery(dead)

    def _holds_decode_kv(self, rank: int) -> bool:
        return self._rank_config(rank)["role"] != "prompt"

    @property
    def procs(self) -> list:
        """The worker processes this controller started (none for external workers)."""
        return self.launcher.procs

    # ------------------------------------------------------------------ replication and the prefix cache
    def holder_ranks(self, rank: int) -> list[int]:
        """The ranks holding `rank`'s replicas, first to last (none without replication)."""
        return self.replication.holder_ranks(rank, self._rank_config(rank), self.tp)

    def set_replication(self, on: bool, every: int = 1) -> None:
        """Pause or resume replication between requests (to measure what it costs on one deployment).
        Requests served while it is paused have no replicas: after a failure they start over.
        `every` > 1: workers gather and send the slots of up to that many steps at once (a batch
        leaves after 50 ms anyway); watermarks then trail by up to every - 1 steps more."""
        msg = self.replication.command(on, every)
        if self.has_unfinished():
            raise RuntimeError("replication can only be paused or resumed while no request runs")
        for r in range(self.world):
            if self.holder_ranks(r):
                self.channels[r].send(msg)
        if on and self.replication.paused:
            # blocks computed while paused have no replica to share (a tier's are replicated when restored)
            self.reset_prefix_cache(tiers=False)
        self.replication.paused = not on

    # ------------------------------------------------------------------ serving loop
    def add_request(self, prompt, params, request_id=None) -> Sequence:
        seq = super().add_request(prompt, params, request_id)
        try:
            self.policy.check_request(seq)
        except BaseException:
            self.waiting.remove(seq)
            raise
        return seq

    def _enqueue(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.replication.watermark.pop(seq.seq_id, None)
        slot = self.dispatch.slot_of.pop(seq.seq_id, None)
        if slot is None and self.policy.finish(seq, reason):
            return  # a request the policy holds outside the microbatches
        (self.slots[slot] if slot is not None else self.slots[0]).finish(seq, reason)

    def abort(self, seq: Sequence) -> None:
        """Workers may be writing this sequence's blocks right now: then it ends when its step returns."""
        if seq.finished:
            return
        if seq.seq_id in self.dispatch.busy:
            self.dispatch.abort_later.add(seq.seq_id)
        else:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return (bool(self.waiting) or any(s.running for s in self.slots) or any(self.dispatch.inflight)
                or self.policy.has_unfinished())

    def idle_check(self) -> None:
        """Called while no request runs: notice failures (and recover) before the next request comes."""
        if not (self.ft and self.members.started) or self._closed or self._stopping:
            return
        try:
            health.check_procs(self.members)
            health.check_heartbeats(self.members)
            self.members.drain("idle")
        except Failure as f:
            try:
                self.recovery.recover_from(f)
            except Stopped:
                pass
        except Stopped:
            pass

    def step(self) -> list[Sequence]:
        try:
            if not self._stopping:
                try:
                    return self._step()
                except Failure as f:
                    self.recovery.recover_from(f)
                    return []
        except Stopped:
            pass
        return self._stop_all()

    def begin_stop(self) -> None:
        """The deployment is being stopped (a stop signal, shutdown): from now on no worker exit
        is a failure and nothing is recovered; the next step ends every request ("abort")."""
        self._stopping = True

    def _stop_all(self) -> list[Sequence]:
        """Stopping: every request still here ends now (finish reason "abort"); returns them."""
        self._abandon_inflight()
        held = self.policy.stop()  # (its queues emptied into self.waiting)
        seqs = list(self.waiting) + [s for slot in self.slots for s in slot.running] + held
        self.waiting.clear()
        for slot in self.slots:
            slot.running.clear()
        for s in seqs:
            if not s.finished:
                s.status, s.finish_reason = Status.FINISHED, "abort"
        return seqs

    def _step(self) -> list[Sequence]:
        self.policy.feed()  # disaggregation: prefills out, admitted requests into microbatches
        for i, slot in enumerate(self.slots):
            if self.dispatch.inflight[i] is None:
                seqs, is_prefill = slot.schedule()
                if seqs:
                    self.dispatch.launch(i, seqs, is_prefill and self.policy.prefills_in_slots, tiers=self._tier_ops(
                        slot, seqs, is_prefill) if self.policy.prefills_in_slots else None)
        self.peak_running = max(self.peak_running, sum(len(s.running) for s in self.slots))
        if not (any(self.dispatch.inflight) or self.policy.in_flight()):
            if self.policy.stalled():
                raise RuntimeError("scheduler stalled: waiting requests but nothing can run")
            return []
        msg = self._next_message(time.monotonic() + self.timeout, "running a step")
        return self.dispatch.on_tokens(msg) if msg.t == "tokens" else self.policy.on_message(msg)

    # ------------------------------------------------------------------ fault tolerance
    def _token_side(self) -> list[Sequence]:
        """Requests whose KV lives in the decode workers' caches."""
        return [s for slot in self.slots for s in slot.running] + self.policy.admitted()

    def _abandon_inflight(self) -> list[str]:
        """Every in-flight step is lost (it passed through every stage); the policy's work in flight
        too. Returns the KV keys workers drop. A pipeline step's sequences go back to their KV before
        it (a prefill lost on a link, or a restore that failed on one worker, left none there)."""
        for inf in self.dispatch.inflight:
            for s in inf[1] if inf is not None else ():
                if s.step_start is not None:  # (set by _tier_ops; disaggregation's token steps keep theirs)
                    s.num_cached = min(s.num_cached, s.step_start)
        self.dispatch.abandon()
        return self.policy.abandon()

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        if self._closed:
            return
        self._stopping = self._closed = True
        self.members.shutdown()
        self.launcher.stop(timeout=10.0)
        self.members.close()
        self.policy.close()

    def cluster(self) -> list[dict]:
        return self.members.cluster()

    def fault_tolerance(self) -> dict:
        """For /v1/cluster and /metrics."""
        rec = self.recovery
        return {"recovery": rec.policy, "replicate": self.replication.enabled, "failures": len(rec.failures),
                "recoveries": rec.failures, "recomputed_tokens": rec.recomputed_tokens,
                "spare_workers": rec.spares, "standbys": rec.weights.listing(self._standbys),
                "replicated_bytes": sum(self.replication.bytes.values())}
