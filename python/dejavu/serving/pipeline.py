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
import os
import queue
import secrets
import threading
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
from ..cluster import launch, placement
from ..cluster.errors import WorkerError
from ..cluster.launch import Launcher
from ..cluster.recovery import Failure as _Failure, Recovery, Stopped as _Stopped, recovery_policy
from ..cluster.replication import Replication
from ..cluster.messages import (Config, MessageError, Pipes, ReplicateConfig, SampleExtra, Shutdown, Step, StepSeq,
                                SwapConfig, unpack_tokens)
from ..kvstream.net import LOOPBACK, WILDCARDS, Address, listen, parse_host_port
from ..parallel.auth import TOKEN_ENV, Acceptor, cluster_prefix

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


@dataclasses.dataclass
class Dead:
    """Internal (never on the wire): a worker's control connection broke."""
    rank: int
    msg: str
    t: str = "dead"


@dataclasses.dataclass
class Joined:
    """Internal (never on the wire): a worker connected after start-up (a replacement or a standby)."""
    ch: object
    hello: object
    t: str = "joined"



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
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self._stopping = False  # begin_stop(): no worker exit is a failure any more
        self.slot_of: dict[int, int] = {}
        self._busy: set[int] = set()          # sequences in a step that workers are running
        self._ipc: dict[int, dict] = {}        # CUDA IPC handles of token workers' caches
        self._abort_later: set[int] = set()   # aborted while busy: finished when their step returns
        self.swap = resident_microbatches if swap else 0
        self.swap_stats: dict[int, dict] = {}  # per worker: bytes in/out, seconds waiting for swap-ins
        self.peak_running = 0                  # most sequences running at once (bench swap)
        # The sampling stage's decode steps (seconds; bench replication overhead): the latest ones,
        # and totals for /metrics.
        self.decode_steps: deque[float] = deque(maxlen=1 << 16)
        self.decode_step_totals = [0, 0.0]
        if swap and not 1 <= resident_microbatches:
            raise ValueError(f"resident_microbatches must be >= 1, got {resident_microbatches}")
        # prefix caching: blocks named here once for every stage (each caches its own layers' K/V)
        self.prefix_salt = (prefix_salt(model_identity(source, seed), dtype, 0, cfg.num_layers)
                            if config.enable_prefix_caching else None)
        self._plan(cfg, pp, layer_split, microbatch_size)
        self._setup_fault_tolerance(launcher, replicate, replicate_dir, replicate_to, recovery, heartbeat_interval,
                                    heartbeat_timeout, spare_workers)
        # The cluster token: the operator's (external workers started with it), else a new one.
        self.token = os.environ.get(TOKEN_ENV) or secrets.token_hex(16)
        bind, port = parse_host_port(cluster_address) if cluster_address else (LOOPBACK, 0)
        self._listener = listen(bind, port)
        self.port = self._listener.getsockname()[1]
        self._accept = Acceptor(self._listener, self.token, self.world)  # HELLOs, each on a thread of its own
        # what workers dial (those started here, when the controller listens on every interface)
        self.controller_addr = controller = str(Address(LOOPBACK if bind in WILDCARDS else bind, self.port))
        self.log_dir = log_dir
        self.launcher = Launcher(controller, self.token, device.type, log_dir)
        self.launcher.start(launcher, self.world, hostfile, recovery=self.ft)
        try:
            self._rendezvous(source.spec, device, dtype, seed, cfg)
        except BaseException:
            self.shutdown()
            raise

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

    def _setup_fault_tolerance(self, launcher, replicate, replicate_dir, replicate_to, recovery, hb_interval,
                               hb_timeout, spare_workers: int = 1) -> None:
        policy = recovery_policy(recovery, self.tp, launcher, replicate)
        if hb_interval <= 0 or hb_timeout <= hb_interval:
            raise ValueError(f"heartbeat interval ({hb_interval}s) must be > 0 and below the timeout ({hb_timeout}s)")
        self.ft = policy != "off"
        self.recovery = Recovery(self, policy, spare_workers)
        self.hb_interval, self.hb_timeout = hb_interval, hb_timeout
        # the stages that hold decode KV: the pipeline, or the token pipeline
        self.replication = Replication(replicate, self.pp, replicate_to, replicate_dir)
        self._epoch = 0
        self._epoch_step = 0
        self._gen: dict[int, int] = {}
        self._last_seen: dict[int, float] = {}
        self._started = False
        self._standbys: list = []
        self._needed: set[int] = set()
        self._fenced: list = []  # channels of replaced workers that may still live (recovery.fence)

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
        if on and self.replication.paused:
            self.reset_prefix_cache()  # blocks computed while paused have no replica to share
        self.replication.paused = not on

    def reset_prefix_cache(self) -> None:
        """Forget every block name (a worker was replaced, or blocks have no replica)."""
        for a in {id(s.allocator): s.allocator for s in self.slots}.values():  # each slot's own when swapping
            a.reset_prefix_cache()

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

    # ------------------------------------------------------------------ start-up
    def _rendezvous(self, spec, device, dtype, seed, cfg) -> None:
        deadline = time.monotonic() + self.timeout
        self.channels = {}
        self.worker_info = {}
        while len(self.channels) < self.world:
            self._check_procs()
            try:
                ch, hello = self._accept.get(min(1.0, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise WorkerError(f"only {len(self.channels)} of {self.world} workers connected within "
                                      f"{self.timeout}s") from None
                continue
            if hello.standby and self.ft:  # an external standby started with the workers: kept for later
                self._standbys.append((ch, hello))
                continue
            # no rank given (external workers): the lowest one not taken
            rank = hello.rank if hello.rank is not None else min(set(range(self.world)) - set(self.channels))
            if hello.standby or rank in self.channels:  # refused; the deployment goes on starting
                log.warning("refused a worker announcing %s while starting: expected a new rank in [0, %d)",
                            "standby" if hello.standby else f"rank {rank}", self.world)
                ch.close()
                continue
            self.channels[rank] = ch
            rc = self._rank_config(rank)
            self.worker_info[rank] = {"pid": hello.pid, "host": hello.host, "role": rc["role"],
                                      "stage": (rank - rc["first_rank"]) // self.tp, "tp_rank": rank % self.tp,
                                      "worker": rc["worker_name"],
                                      "layers": rc["layers"][(rank - rc["first_rank"]) // self.tp]}
            self._place(rank, hello)
        hosts = {r: i["host_id"] for r, i in self.worker_info.items()}
        for r, lr in placement.local_ranks(hosts, {r: i["local_rank"] for r, i in self.worker_info.items()}).items():
            self.worker_info[r]["local_rank"] = lr
        self._place_holders()
        backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= self.world else "gloo"
        master = str(Address(self.worker_info[0]["addr"], self.worker_info[0]["dist_port"]))
        self._config = {"model": spec, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                        "seed": seed, "tp": self.tp, "block_size": self.block_size, "master": master,
                        "world": self.world, "backend": backend, "timeout": self.timeout,
                        "tp_groups": self._tp_groups(), "kv_token": self.token, "pipes": self.ft,
                        "heartbeat_interval": self.hb_interval if self.ft else 0}
        for rank, ch in self.channels.items():
            ch.send(self._config_for(rank))
        for rank, ch in self.channels.items():
            self._start_reader(rank, ch)
        ready = set()
        while len(ready) < self.world:
            msg = self._next_message(deadline, "starting")
            if msg.t == "ready":
                ready.add(msg.rank)
                self._on_ready(msg)
        self._started = True
        if self.ft:
            for rank in range(self.world):
                self.channels[rank].send(self._pipes_msg(rank))
            threading.Thread(target=self._acceptor, daemon=True, name="controller-accept").start()
            self.launcher.spawn_spares(self.recovery.spares)
        self._after_ready()
        log.info("%d workers ready (TP %d): %s", self.world, self.tp,
                 ", ".join(f"{i['worker']} layers {i['layers']}" for _, i in sorted(self.worker_info.items())))

    def _config_for(self, rank: int, epoch: int = 0) -> Config:
        rc = self._rank_config(rank)
        rep = None
        if self.replication.enabled and rc["role"] != "prompt":
            rep = ReplicateConfig(dir=self.replication.dir, prefix=cluster_prefix(self.token))
        info = self.worker_info[rank]
        return Config(**self._config, rank=rank, **rc, replicate=rep, epoch=epoch, kv_host=info["addr"],
                      local_rank=info["local_rank"])

    def _place(self, rank: int, hello) -> None:
        """Where `rank`'s worker is (its HELLO): the address its peers dial, its host."""
        self.worker_info[rank].update(pid=hello.pid, host=hello.host, addr=hello.addr or LOOPBACK,
                                      host_id=hello.host_id or hello.host, local_rank=hello.local_rank,
                                      dist_port=hello.dist_port)

    def _place_holders(self) -> None:
        """Each stage's replica holder on another host whenever one exists (unless replicate_to says)."""
        first = min(r for r in range(self.world) if self._holds_decode_kv(r))
        self.replication.place([self.worker_info[first + s * self.tp]["host_id"] for s in range(self.pp)])

    def address(self, rank: int, port_key: str) -> list:
        """[host, port] where peers reach `rank`'s listener `port_key` (pipe_port, replica_port, kv_port)."""
        return [self.worker_info[rank]["addr"], self.worker_info[rank][port_key]]

    def _on_ready(self, msg) -> None:
        info = self.worker_info[msg.rank]
        for k in ("kv_port", "pipe_port", "replica_port", "load_s"):
            if getattr(msg, k) is not None:
                info[k] = getattr(msg, k)
        if msg.ipc is not None:
            self._ipc[msg.rank] = msg.ipc

    def _pipes_msg(self, rank: int) -> Pipes:
        """Rank's neighbours in its pipeline (and its replica holder) for the current epoch."""
        rc = self._rank_config(rank)
        stage = (rank - rc["first_rank"]) // self.tp
        nxt = rank + self.tp if stage < rc["pp"] - 1 else None
        holder = self.holder_rank(rank)
        return Pipes(epoch=self._epoch, prev=rank - self.tp if stage > 0 else None,
                     next=self.address(nxt, "pipe_port") + [nxt] if nxt is not None else None,
                     holder=self.address(holder, "replica_port") if holder is not None else None)

    def _after_ready(self) -> None:
        """Hook for deployments that must introduce workers to each other once all are up."""

    def _start_reader(self, rank: int, ch) -> None:
        gen = self._gen[rank] = self._gen.get(rank, 0) + 1
        ch.stamp = lambda: self._epoch  # every message to a worker carries the current epoch
        self._last_seen[rank] = time.monotonic()
        threading.Thread(target=self._reader, args=(rank, ch, gen), daemon=True, name=f"worker{rank}-reader").start()

    def _reader(self, rank, ch, gen) -> None:
        try:
            while True:
                try:
                    msg = ch.recv(None)
                except MessageError as e:  # refused: the worker is cut off (and replaced) like a dead one
                    log.warning("worker %d sent a malformed message (%s): closing its connection", rank, e)
                    ch.close()
                    raise ConnectionError(f"malformed message: {e}") from None
                if gen != self._gen.get(rank):
                    continue  # a replaced (fenced) worker: read until it goes, heed nothing
                self._last_seen[rank] = time.monotonic()
                if msg.t == "hb":
                    continue
                if msg.epoch < self._epoch and msg.t not in ("ready", "error"):
                    continue  # refused: sent before the worker heard of the last recovery (stale)
                if hasattr(msg, "rank"):
                    msg.rank = rank  # a worker speaks for its own rank only
                self._inbox.put((rank, gen, msg))
        except (ConnectionError, OSError) as e:
            if not self._closed:
                self._inbox.put((rank, gen, Dead(rank=rank, msg=str(e))))

    def _acceptor(self) -> None:
        """After start-up: replacement workers and standbys connect at any time."""
        while not self._closed:
            try:
                ch, hello = self._accept.get(1.0)
            except TimeoutError:
                continue
            self._inbox.put((None, None, Joined(ch=ch, hello=hello)))

    def _next_message(self, deadline: float, doing: str) -> dict:
        while True:
            if self._stopping:
                raise _Stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"workers did not answer within {self.timeout}s while {doing}")
            try:
                msg = self._inbox.get(timeout=min(left, 0.25 if self.ft else 1.0))
            except queue.Empty:
                self._check_procs()
                self._check_heartbeats()
                continue
            msg = self._classify(msg, doing)
            if msg is not None:
                return msg

    def _classify(self, item: tuple, doing: str):
        """Handles bookkeeping messages and failures; returns those the caller must see."""
        rank, gen, msg = item
        if rank is not None and gen != self._gen.get(rank):
            return None  # from a worker already replaced
        t = msg.t
        if t == "error":
            raise WorkerError(f"worker {msg.rank} failed: {msg.msg}")
        if t == "dead":
            if self._stopping:
                raise _Stopped()
            if self.ft and self._started:
                raise _Failure({msg.rank}, f"worker {msg.rank} disconnected: {msg.msg}")
            raise WorkerError(f"worker {msg.rank} disconnected while {doing}: {msg.msg}")
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
            return msg if self._on_joined(msg) else None
        return msg

    def idle_check(self) -> None:
        """Called while no request runs: notice failures (and recover) before the next request comes."""
        if not (self.ft and self._started) or self._closed or self._stopping:
            return
        try:
            self._check_procs()
            self._check_heartbeats()
            while True:
                self._classify(self._inbox.get_nowait(), "idle")
        except queue.Empty:
            pass
        except _Failure as f:
            try:
                self.recovery.recover_from(f)
            except _Stopped:
                pass
        except _Stopped:
            pass

    def _check_procs(self) -> None:
        if self._stopping:
            return  # workers exit because we stop them: not failures
        if self.ft and self._started:  # a dead rank is replaced (even when no process is left to watch)
            for rank, p in list(self.launcher.proc_of.items()):
                if p.poll() is None:
                    continue
                if rank in self._needed:
                    raise _Failure({rank}, f"the replacement for rank {rank} (pid {p.pid}) exited with status "
                                           f"{p.returncode} while starting")
                raise _Failure({rank}, f"worker process {p.pid} (rank {rank}) exited with status {p.returncode}")
            self.recovery.respawn_unserved()
            return
        for p in self.procs:
            if p.poll() is not None:
                raise WorkerError(f"worker process {p.pid} exited with status {p.returncode}")

    def _check_heartbeats(self) -> None:
        if not (self.ft and self._started) or self._stopping:
            return
        now = time.monotonic()
        silent = {r for r in self.channels if r not in self._needed and now - self._last_seen.get(r, now) > self.hb_timeout}
        if silent:
            raise _Failure(silent, f"no heartbeat from rank(s) {sorted(silent)} for {self.hb_timeout}s")

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
        # (a block shared by several of its requests once: it is swapped once)
        live = list(dict.fromkeys(b for s in self.slots[slot].running for b in s.block_table)) if self.swap else None
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
                if self.ft and self._started:
                    raise _Failure({r}, f"worker {r} is unreachable: {e}") from None
                raise WorkerError(f"worker {r} is unreachable: {e}") from None

    # ------------------------------------------------------------------ fault tolerance
    def _stale(self, step_id: int) -> bool:
        """A reply to a step (or prefill, admission) from before the last recovery."""
        return self.ft and step_id <= self._epoch_step

    def _on_joined(self, msg: Joined) -> bool:
        """A connection after start-up: a standby joins the pool; a replacement for a rank we wait
        for is taken (returned to the recovery loop); anything else is turned away."""
        ch, hello = msg.ch, msg.hello
        if hello.standby or hello.rank is None:  # after start-up a worker without a rank stands by
            self._standbys.append((ch, hello))
            log.info("standby worker registered (pid %s on %s)", hello.pid, hello.host)
            return bool(self._needed)
        if hello.rank in self._needed and hello.rank not in self.channels:
            return True
        try:
            ch.send(Shutdown())
        finally:
            ch.close()
        log.warning("turned away a worker announcing rank %s: no such rank is being replaced", hello.rank)
        return False

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
        standbys = list(getattr(self, "_standbys", []))
        while True:  # standbys that registered while nothing read the inbox
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[2].t == "joined":
                standbys.append((msg[2].ch, msg[2].hello))
        while True:  # and those accepted that nothing took yet
            try:
                standbys.append(self._accept.joined.get_nowait())
            except queue.Empty:
                break
        for ch, _ in standbys:
            try:
                ch.send(Shutdown())
            except OSError:
                pass
        for ch in getattr(self, "channels", {}).values():
            try:
                ch.send(Shutdown())
            except OSError:
                pass
        self.launcher.stop(timeout=10.0)
        for ch in list(getattr(self, "channels", {}).values()) + getattr(self, "_fenced", []):
            ch.close()
        self._accept.close()
        self._listener.close()

    def cluster(self) -> list[dict]:
        return [{"rank": r, **info} for r, info in sorted(self.worker_info.items())]

    def fault_tolerance(self) -> dict:
        """For /v1/cluster and /metrics."""
        rec = self.recovery
        return {"recovery": rec.policy, "replicate": self.replication.enabled, "failures": len(rec.failures),
                "recoveries": rec.failures, "recomputed_tokens": rec.recomputed_tokens,
                "replicated_bytes": sum(self.replication.bytes.values())}
