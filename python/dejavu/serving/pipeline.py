"""The FasterTransformer-style pipeline: the controller side.

D = pp stages, each tp worker processes holding a contiguous layer range (routing.split_layers,
overridable) split tensor-parallel: column-parallel projections hold a slice of the heads / MLP
width, row-parallel ones sum over the stage's TP group (gloo on CPU, NCCL across GPUs). The controller keeps up to D microbatches in flight, round-robin: each microbatch
slot has its own scheduler (continuous batching, up to `microbatch_size` sequences) over one
shared waiting queue and one shared block allocator (every stage's cache uses the same block ids
for its own layers). A slot's next step (prefill of newly admitted requests, or one decode token
for its running ones) is sent to every worker as soon as its previous step's tokens are back.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

import torch

from ..engine.block_manager import BlockAllocator
from ..engine.kv_cache import PagedKVCache
from ..engine.llm_engine import EngineConfig, LLMEngine, eos_ids, prefix_salt
from ..engine.sampler import wire_fields
from ..engine.scheduler import Scheduler
from ..engine.sequence import Sequence, Status
from ..kvstream.routing import split_layers
from ..models.loader import ModelSource, model_identity
from ..models.tp import check as tp_check
from ..cluster.errors import WorkerError
from ..cluster.launch import Launcher
from ..cluster.recovery import Failure as _Failure, Recovery, Stopped as _Stopped, recovery_policy
from ..cluster.replication import Replication
from ..cluster.membership import Membership
from ..cluster.messages import SampleExtra, Step, StepSeq, SwapConfig, unpack_tokens

log = logging.getLogger("dejavu.pipeline")


def check_split(layers, depth: int, num_layers: int) -> None:
    if len(layers) != depth:
        raise ValueError(f"layer split has {len(layers)} stages but the depth is {depth}")
    expect = 0
    for a, b in layers:
        if a != expect or b <= a:
            raise ValueError(f"layer split {layers} must be contiguous, non-empty ranges from 0")
        expect = b
    if expect != num_layers:
        raise ValueError(f"layer split {layers} does not end at the model's {num_layers} layers")


def _extra(x: dict | None) -> SampleExtra | None:
    return None if x is None else SampleExtra(**x)


class PipelineEngine(LLMEngine):
    def __init__(self, source: ModelSource, tokenizer, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, seed: int, pp: int, tp: int = 1, microbatch_size: int = 0, launcher: str = "local",
                 layer_split: list[tuple[int, int]] | None = None, timeout: float = 300.0,
                 hostfile: str | None = None, log_dir: str | None = None, swap: bool = False,
                 resident_microbatches: int = 2, replicate: bool = False, replicate_dir: str | None = None,
                 replicate_to: list[int] | None = None, recovery: str = "auto", heartbeat_interval: float = 0.5,
                 heartbeat_timeout: float = 2.0, spare_workers: int = 1, cluster_address: str | None = None):
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
        self._step_id = 0
        self._closed = False
        self._stopping = False  # begin_stop(): no worker exit is a failure any more
        self.slot_of: dict[int, int] = {}
        self._busy: set[int] = set()          # sequences in a step that workers are running
        self._abort_later: set[int] = set()   # aborted while busy: finished when their step returns
        self.swap = resident_microbatches if swap else 0
        self.swap_stats: dict[int, dict] = {}  # per worker: bytes in/out, seconds waiting for swap-ins
        self.peak_running = 0                  # most sequences running at once (bench swap)
        # The sampling stage's decode steps (seconds; bench replication overhead): the latest ones,
        # and totals for /metrics.
        self.decode_steps: deque[float] = deque(maxlen=1 << 16)
        self.decode_step_totals = [0, 0.0]
        # prefix caching: blocks named here once for every stage (each caches its own layers' K/V)
        self.prefix_salt = (prefix_salt(model_identity(source, seed), dtype, 0, cfg.num_layers)
                            if config.enable_prefix_caching and not swap else None)
        self._plan(cfg, pp, layer_split, microbatch_size)
        self._setup_fault_tolerance(launcher, replicate, replicate_dir, replicate_to, recovery, spare_workers)
        self.members = Membership(self, cluster_address, heartbeat_interval, heartbeat_timeout)
        self._share_members()
        self.log_dir = log_dir
        self.launcher = Launcher(self.controller_addr, self.token, device.type, log_dir)
        self.launcher.start(launcher, self.world, hostfile, recovery=self.ft)
        try:
            self.members.rendezvous(source.spec, device, dtype, seed)
        except BaseException:
            self.shutdown()
            raise

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

    def _plan(self, cfg, pp: int, layer_split, microbatch_size: int) -> None:
        """Decide the workers: here pp stages x tp shards, one block allocator, pp microbatch slots."""
        self.pp, self.world = pp, pp * self.tp
        self.layers = layer_split or split_layers(cfg.num_layers, pp)
        check_split(self.layers, pp, cfg.num_layers)
        self.num_blocks = self._blocks_for(cfg, self.layers, self.config.num_blocks, self.config.kv_cache_memory)
        self.allocator = BlockAllocator(self.num_blocks)
        self.waiting: deque[Sequence] = deque()
        b = microbatch_size or self.config.max_num_seqs
        self.slots = [Scheduler(a, self.block_size, b, self.config.max_num_batched_tokens, self.waiting,
                                self.config.admission, self.prefix_salt)
                      for a in self._slot_allocators(pp)]
        self.inflight: list[tuple[int, list[Sequence], float] | None] = [None] * pp
        self.scheduler = self.slots[0]  # for code that asks for "the" scheduler (counts, preemptions)

    def _slot_allocators(self, slots: int) -> list[BlockAllocator]:
        """The block allocator of each of `slots` microbatch slots: the shared one; or with swapping,
        where the device budget (num_blocks) holds `swap` microbatches, a region's worth of logical
        blocks of each slot's own, all of them kept in host memory."""
        if not self.swap:
            return [self.allocator] * slots
        k = min(self.swap, slots)
        self.region_blocks = self.num_blocks // k
        if self.region_blocks <= 0:
            raise ValueError(f"{self.num_blocks} KV blocks cannot hold {k} resident microbatches")
        self.device_blocks, self.host_blocks, self.swap = self.region_blocks * k, self.region_blocks * slots, k
        self.num_blocks = self.region_blocks  # what one microbatch (so one request) can hold
        return [BlockAllocator(self.region_blocks, first=i * self.region_blocks) for i in range(slots)]

    def _swap_config(self, rc: dict) -> dict:
        """A KV-holding worker's config, with its device cache and host copy sizes when swapping."""
        if self.swap:
            rc.update(num_blocks=self.device_blocks, swap=SwapConfig(resident=self.swap, host_blocks=self.host_blocks))
        return rc

    def _setup_fault_tolerance(self, launcher, replicate, replicate_dir, replicate_to, recovery,
                               spare_workers: int = 1) -> None:
        policy = recovery_policy(recovery, self.tp, launcher, replicate)
        self.ft = policy != "off"
        self.recovery = Recovery(self, policy, spare_workers)
        # the stages that hold decode KV: the pipeline, or the token pipeline
        self.replication = Replication(replicate, self.pp, replicate_to, replicate_dir)
        self._epoch_step = 0

    @property
    def procs(self) -> list:
        """The worker processes this controller started (none for external workers)."""
        return self.launcher.procs

    def holder_rank(self, rank: int) -> int | None:
        """The rank holding `rank`'s replica, or None."""
        return self.replication.holder_rank(rank, self._rank_config(rank), self.tp)

    def set_replication(self, on: bool, every: int = 1) -> None:
        """Pause or resume replication between requests (to measure what it costs on one deployment).
        Requests served while it is paused have no replicas: after a failure they start over.
        `every` > 1: workers gather and send the slots of up to that many steps at once (a batch
        leaves after 50 ms anyway); watermarks then trail by up to every - 1 steps more."""
        msg = self.replication.command(on, every)
        if self.has_unfinished():
            raise RuntimeError("replication can only be paused or resumed while no request runs")
        for r in range(self.world):
            if self.holder_rank(r) is not None:
                self.channels[r].send(msg)
        self.replication.paused = not on

    def _blocks_for(self, cfg, layers, num_blocks: int, memory: int) -> int:
        deepest = max(b - a for a, b in layers)
        per_block = PagedKVCache.bytes_per_block(deepest, self.block_size, cfg.num_kv_heads // self.tp, cfg.head_dim,
                                                 self.dtype)
        return num_blocks or max(1, memory // per_block)

    def _rank_config(self, rank: int) -> dict:
        stage = rank // self.tp
        return self._swap_config({"role": "stage", "pp": self.pp, "layers": [list(x) for x in self.layers],
                                  "first_rank": 0, "num_blocks": self.num_blocks,
                                  "worker_name": f"s{stage}.{rank % self.tp}"})

    def _step_ranks(self):
        """The workers that run the microbatch steps (all of them here)."""
        return range(self.world)

    def _tp_groups(self) -> list[list[int]]:
        return [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.world // self.tp)]

    def _after_ready(self) -> None:
        """Hook for deployments that must introduce workers to each other once all are up."""

    def _classify(self, item: tuple, doing: str):
        """Handles bookkeeping messages and failures; returns those the caller must see."""
        rank, gen, msg = item
        if rank is not None and gen != self._gen.get(rank):
            return None  # from a worker already replaced
        t = msg.t
        if t == "error":
            raise WorkerError(f"worker {msg.rank} failed: {msg.msg}")
        if t == "dead":
            self.members.check_dead(msg, doing)
        if t == "step_failed":
            if msg.id > self._epoch_step:  # a live link broke: reset and replay, even if no one died
                raise _Failure(set(), f"worker {msg.rank} lost step {msg.id}: {msg.msg}")
            return None
        if t == "replicated":
            self.replication.on_replicated(msg)
            return None
        if t == "swapstats":
            self.swap_stats[msg.rank] = dataclasses.asdict(msg)
            return None
        if t == "rereplicated":
            if msg.error:
                log.warning("worker %d could not re-seed its replica holder: %s", msg.rank, msg.error)
            return None
        if t == "joined":
            return msg if self.members.on_joined(msg) else None
        return msg

    def idle_check(self) -> None:
        """Called while no request runs: notice failures (and recover) before the next request comes."""
        if not (self.ft and self.members.started) or self._closed or self._stopping:
            return
        try:
            self.members.check_procs()
            self.members.check_heartbeats()
            self.members.drain("idle")
        except _Failure as f:
            try:
                self.recovery.recover_from(f)
            except _Stopped:
                pass
        except _Stopped:
            pass


    # ------------------------------------------------------------------ serving loop
    def _enqueue(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.replication.watermark.pop(seq.seq_id, None)
        slot = self.slot_of.pop(seq.seq_id, None)
        sched = self.slots[slot] if slot is not None else self.slots[0]
        sched.finish(seq, reason)

    def abort(self, seq: Sequence) -> None:
        """Workers may be writing this sequence's blocks right now: then it ends when its step returns."""
        if seq.finished:
            return
        if seq.seq_id in self._busy:
            self._abort_later.add(seq.seq_id)
        else:
            self._finish(seq, "abort")

    def _returned(self, seqs: list[Sequence]) -> list[Sequence]:
        """Sequences whose step came back: not busy any more; deferred aborts happen now."""
        live = []
        for s in seqs:
            self._busy.discard(s.seq_id)
            if s.seq_id in self._abort_later:
                self._abort_later.discard(s.seq_id)
                if not s.finished:
                    self._finish(s, "abort")
            elif not s.finished:
                live.append(s)
        return live

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(s.running for s in self.slots) or any(self.inflight)

    def step(self) -> list[Sequence]:
        try:
            if not self._stopping:
                try:
                    return self._step()
                except _Failure as f:
                    self.recovery.recover_from(f)
                    return []
        except _Stopped:
            pass
        return self._stop_all()

    def begin_stop(self) -> None:
        """The deployment is being stopped (a stop signal, shutdown): from now on no worker exit
        is a failure and nothing is recovered; the next step ends every request ("abort")."""
        self._stopping = True

    def _stop_all(self) -> list[Sequence]:
        """Stopping: every request still here ends now (finish reason "abort"); returns them."""
        self._abandon_inflight()
        seqs = list(self.waiting) + self._token_side()
        self.waiting.clear()
        for slot in self.slots:
            slot.running.clear()
        for s in seqs:
            if not s.finished:
                s.status, s.finish_reason = Status.FINISHED, "abort"
        return seqs

    def _step(self) -> list[Sequence]:
        for i, slot in enumerate(self.slots):
            if self.inflight[i] is None:
                seqs, is_prefill = slot.schedule()
                if seqs:
                    self._launch(i, seqs, is_prefill)
        self.peak_running = max(self.peak_running, sum(len(s.running) for s in self.slots))
        if not any(self.inflight):
            if self.waiting:
                raise RuntimeError("scheduler stalled: waiting requests but nothing can run")
            return []
        msg = self._next_message(time.monotonic() + self.timeout, "running a step")
        return self._on_tokens(msg) if msg.t == "tokens" else []

    def _on_tokens(self, msg) -> list[Sequence]:
        """A microbatch's sampled tokens came back: append them to the sequences still live."""
        i = msg.mb
        if not 0 <= i < len(self.inflight):  # refused without effect
            log.warning("a worker answered for microbatch %d, which does not exist", i)
            return []
        if (self.inflight[i] is None or self.inflight[i][0] != msg.id) and self._stale(msg.id):
            return []  # a step from before a recovery: replayed already
        step_id, seqs, _ = self.inflight[i]
        if msg.id != step_id:
            raise WorkerError(f"microbatch {i}: expected step {step_id}, got {msg.id}")
        self.inflight[i] = None
        if msg.step_s is not None:  # the sampling stage's previous decode step (worker.py)
            self.decode_steps.append(msg.step_s)
            self.decode_step_totals[0] += 1
            self.decode_step_totals[1] += msg.step_s
        live = {id(s) for s in self._returned(seqs)}
        tokens = unpack_tokens(msg.tokens, msg.logprobs)
        self._append_tokens([s for s in seqs if id(s) in live], [t for s, t in zip(seqs, tokens) if id(s) in live])
        return seqs

    def _step_item(self, s: Sequence, start: int, blocks: list[int], **extra) -> StepSeq:
        """One sequence's part of a step message: its new tokens from `start`, where their KV goes,
        and what the last stage needs to sample its next token."""
        p = s.params
        return StepSeq(ids=s.token_ids[start:], start=start, blocks=blocks, temp=p.temperature, top_k=p.top_k,
                       top_p=p.top_p, seed=s.seed, banned=self._banned(s),
                       x=_extra(wire_fields(p, s.token_ids, s.num_prompt_tokens)), **extra)

    def _launch(self, slot: int, seqs: list[Sequence], is_prefill: bool) -> None:
        self._step_id += 1
        items = []
        for s in seqs:
            # From the first token without KV: everything for a prefill, the newest token for a decode,
            # more after a recovery (from the request's watermark).
            items.append(self._step_item(s, s.num_cached, s.block_table))
            s.num_cached = len(s)
            self.slot_of[s.seq_id] = slot
            self._busy.add(s.seq_id)
        self.replication.expect(self._step_id, self._step_ranks(), [(s, len(s)) for s in seqs])
        # with swapping, every block the microbatch holds now: workers keep exactly these resident
        live = [b for s in self.slots[slot].running for b in s.block_table] if self.swap else None
        msg = Step(mb=slot, id=self._step_id, prefill=is_prefill, seqs=items, live=live)
        self.inflight[slot] = (self._step_id, seqs, time.monotonic())  # before sending: a failed send loses it
        self._send_to(self._step_ranks(), msg)

    def _send_to(self, ranks, msg) -> None:
        """A message on the serving path: a worker whose channel is gone has died (kill -9 before
        its death was noticed), which is a failure to recover from, not the controller's error."""
        for r in ranks:
            try:
                self.channels[r].send(msg)
            except OSError as e:
                if self.ft and self.members.started:
                    raise _Failure({r}, f"worker {r} is unreachable: {e}") from None
                raise WorkerError(f"worker {r} is unreachable: {e}") from None

    # ------------------------------------------------------------------ fault tolerance
    def _stale(self, step_id: int) -> bool:
        """A reply to a step (or prefill, admission) from before the last recovery."""
        return self.ft and step_id <= self._epoch_step


    def _token_side(self) -> list[Sequence]:
        """Requests whose KV lives in the decode workers' caches."""
        return [s for slot in self.slots for s in slot.running]

    def _abandon_inflight(self) -> list[str]:
        """Every in-flight step is lost (it passed through every stage); returns KV keys to drop."""
        for i, inf in enumerate(self.inflight):
            if inf is not None:
                self.inflight[i] = None
                self._returned(inf[1])
        self.replication.pending.clear()
        return []

    def _holds_decode_kv(self, rank: int) -> bool:
        return self._rank_config(rank)["role"] != "prompt"

    def _after_recovery(self, dead: set[int]) -> None:
        """Hook: re-introduce workers to each other (disaggregation)."""

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        if self._closed:
            return
        self._stopping = self._closed = True
        self.members.shutdown()
        self.launcher.stop(timeout=10.0)
        self.members.close()

    def cluster(self) -> list[dict]:
        return self.members.cluster()

    def fault_tolerance(self) -> dict:
        """For /v1/cluster and /metrics."""
        rec = self.recovery
        return {"recovery": rec.policy, "replicate": self.replication.enabled, "failures": len(rec.failures),
                "recoveries": rec.failures, "recomputed_tokens": rec.recomputed_tokens,
                "replicated_bytes": sum(self.replication.bytes.values())}
