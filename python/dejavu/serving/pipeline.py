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

import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import deque

import torch

from ..engine.block_manager import BlockAllocator
from ..engine.kv_cache import PagedKVCache
from ..engine.llm_engine import EngineConfig, LLMEngine, eos_ids
from ..engine.scheduler import Scheduler
from ..engine.sequence import Sequence
from ..kvstream.routing import split_layers
from ..models.loader import ModelSource
from ..parallel import launch
from ..parallel.wire import ProtocolError, accept_hello

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


class WorkerError(RuntimeError):
    """A worker failed to start or died; the message names the worker and the reason."""


class PipelineEngine(LLMEngine):
    def __init__(self, source: ModelSource, tokenizer, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, seed: int, pp: int, tp: int = 1, microbatch_size: int = 0, launcher: str = "local",
                 layer_split: list[tuple[int, int]] | None = None, timeout: float = 300.0,
                 hostfile: str | None = None, log_dir: str | None = None, swap: bool = False,
                 resident_microbatches: int = 2):
        cfg = self.model_config = source.config
        self.model = None
        self.tokenizer, self.config, self.device, self.dtype = tokenizer, config, device, dtype
        self.tp = tp
        cfg.shard(0, tp)  # raises ModelError now if tp does not divide the heads or the MLP
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        self.block_size = config.block_size
        self.eos_ids = eos_ids(cfg, tokenizer)
        self.num_generated = 0
        self.timeout = timeout
        self._step_id = 0
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self.slot_of: dict[int, int] = {}
        self._busy: set[int] = set()          # sequences in a step that workers are running
        self._ipc: dict[int, dict] = {}        # CUDA IPC handles of token workers' caches
        self._abort_later: set[int] = set()   # aborted while busy: finished when their step returns
        self.swap = resident_microbatches if swap else 0
        self.swap_stats: dict[int, dict] = {}  # per worker: bytes in/out, seconds waiting for swap-ins
        self.peak_running = 0                  # most sequences running at once (bench swap)
        if swap and not 1 <= resident_microbatches:
            raise ValueError(f"resident_microbatches must be >= 1, got {resident_microbatches}")
        self._plan(cfg, pp, layer_split, microbatch_size)
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        controller = f"127.0.0.1:{self.port}"
        if launcher == "local":
            self.procs = launch.spawn_local(self.world, controller, self.token, log_dir)
        elif launcher == "mpirun":
            self.procs = launch.spawn_mpirun(self.world, controller, self.token, hostfile, log_dir)
        elif launcher == "external":
            self.procs = []
            log.warning("waiting for %d workers: dejavu worker --controller %s (token in DEJAVU_CLUSTER_TOKEN=%s)",
                        self.world, controller, self.token)
        else:
            raise ValueError(f"unknown launcher {launcher!r}; use local, mpirun or external")
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
        allocators = [self.allocator] * pp
        if self.swap:
            # The device budget (num_blocks) holds `swap` microbatches; each of the pp microbatches
            # gets a region's worth of logical blocks of its own, all of them kept in host memory.
            k = min(self.swap, pp)
            self.region_blocks = self.num_blocks // k
            if self.region_blocks <= 0:
                raise ValueError(f"{self.num_blocks} KV blocks cannot hold {k} resident microbatches")
            self.device_blocks = self.region_blocks * k
            allocators = [BlockAllocator(self.region_blocks, first=i * self.region_blocks) for i in range(pp)]
            self.host_blocks = self.region_blocks * pp
            self.swap = k
            self.num_blocks = self.region_blocks  # what one microbatch (so one request) can hold
        self.slots = [Scheduler(a, self.block_size, b, self.config.max_num_batched_tokens, self.waiting)
                      for a in allocators]
        self.inflight: list[tuple[int, list[Sequence], float] | None] = [None] * pp
        self.scheduler = self.slots[0]  # for code that asks for "the" scheduler (counts, preemptions)

    def _blocks_for(self, cfg, layers, num_blocks: int, memory: int) -> int:
        deepest = max(b - a for a, b in layers)
        per_block = PagedKVCache.bytes_per_block(deepest, self.block_size, cfg.num_kv_heads // self.tp, cfg.head_dim,
                                                 self.dtype)
        return num_blocks or max(1, memory // per_block)

    def _rank_config(self, rank: int) -> dict:
        stage = rank // self.tp
        rc = {"role": "stage", "pp": self.pp, "layers": [list(x) for x in self.layers], "first_rank": 0,
              "num_blocks": self.num_blocks, "worker_name": f"s{stage}.{rank % self.tp}"}
        if self.swap:
            rc.update(num_blocks=self.device_blocks, swap={"resident": self.swap, "host_blocks": self.host_blocks})
        return rc

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
                ch, hello = accept_hello(self._listener, self.token, min(1.0, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise WorkerError(f"only {len(self.channels)} of {self.world} workers connected within "
                                      f"{self.timeout}s") from None
                continue
            except ProtocolError as e:
                log.warning("refused a connection: %s", e)
                continue
            rank = int(hello.get("rank", -1))
            if not 0 <= rank < self.world or rank in self.channels:
                ch.close()
                raise WorkerError(f"a worker announced rank {rank}, expected a new one in [0, {self.world})")
            self.channels[rank] = ch
            rc = self._rank_config(rank)
            self.worker_info[rank] = {"pid": hello.get("pid"), "host": hello.get("host"), "role": rc["role"],
                                      "stage": (rank - rc["first_rank"]) // self.tp, "tp_rank": rank % self.tp,
                                      "worker": rc["worker_name"],
                                      "layers": rc["layers"][(rank - rc["first_rank"]) // self.tp]}
        backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= self.world else "gloo"
        master = f"127.0.0.1:{launch.free_port()}"
        for rank, ch in self.channels.items():
            ch.send({"t": "config", "model": spec, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                     "seed": seed, "tp": self.tp, "block_size": self.block_size, "master": master,
                     "world": self.world, "backend": backend, "timeout": self.timeout, "tp_groups": self._tp_groups(),
                     "kv_token": self.token, **self._rank_config(rank)})
        for rank, ch in self.channels.items():
            threading.Thread(target=self._reader, args=(rank, ch), daemon=True, name=f"worker{rank}-reader").start()
        ready = set()
        while len(ready) < self.world:
            msg = self._next_message(deadline, "starting")
            if msg["t"] == "ready":
                ready.add(msg["rank"])
                if "kv_port" in msg:
                    self.worker_info[msg["rank"]]["kv_port"] = msg["kv_port"]
                if "ipc" in msg:
                    self._ipc[msg["rank"]] = msg["ipc"]
        self._after_ready()
        log.info("%d workers ready (TP %d): %s", self.world, self.tp,
                 ", ".join(f"{i['worker']} layers {i['layers']}" for _, i in sorted(self.worker_info.items())))

    def _after_ready(self) -> None:
        """Hook for deployments that must introduce workers to each other once all are up."""

    def _reader(self, rank, ch) -> None:
        try:
            while True:
                self._inbox.put(ch.recv(None))
        except (ConnectionError, OSError) as e:
            if not self._closed:
                self._inbox.put({"t": "dead", "rank": rank, "msg": str(e)})

    def _next_message(self, deadline: float, doing: str) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"workers did not answer within {self.timeout}s while {doing}")
            try:
                msg = self._inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                self._check_procs()
                continue
            if msg["t"] == "error":
                raise WorkerError(f"worker {msg['rank']} failed: {msg['msg']}")
            if msg["t"] == "dead":
                raise WorkerError(f"worker {msg['rank']} disconnected while {doing}: {msg['msg']}")
            return msg

    def _check_procs(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise WorkerError(f"worker process {p.pid} exited with status {p.returncode}")

    # ------------------------------------------------------------------ serving loop
    def _enqueue(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
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
        if msg["t"] == "swapstats":
            self.swap_stats[msg["rank"]] = msg
            return []
        return self._on_tokens(msg) if msg["t"] == "tokens" else []

    def _on_tokens(self, msg: dict) -> list[Sequence]:
        """A microbatch's sampled tokens came back: append them to the sequences still live."""
        i = msg["mb"]
        step_id, seqs, _ = self.inflight[i]
        if msg["id"] != step_id:
            raise WorkerError(f"microbatch {i}: expected step {step_id}, got {msg['id']}")
        self.inflight[i] = None
        live = {id(s) for s in self._returned(seqs)}
        self._append_tokens([s for s in seqs if id(s) in live], [t for s, t in zip(seqs, msg["tokens"]) if id(s) in live])
        return seqs

    def _step_item(self, s: Sequence, start: int, blocks: list[int]) -> dict:
        """One sequence's part of a step message: its new tokens from `start`, where their KV goes,
        and what the last stage needs to sample its next token."""
        p = s.params
        return {"ids": s.token_ids[start:], "start": start, "blocks": blocks, "temp": p.temperature, "top_k": p.top_k,
                "top_p": p.top_p, "seed": s.seed, "banned": self._banned(s)}

    def _launch(self, slot: int, seqs: list[Sequence], is_prefill: bool) -> None:
        self._step_id += 1
        items = []
        for s in seqs:
            items.append(self._step_item(s, s.num_cached if is_prefill else len(s) - 1, s.block_table))
            s.num_cached = len(s)
            self.slot_of[s.seq_id] = slot
            self._busy.add(s.seq_id)
        msg = {"t": "step", "mb": slot, "id": self._step_id, "prefill": is_prefill, "seqs": items}
        if self.swap:  # every block the microbatch holds now: workers keep exactly these resident
            msg["live"] = [b for s in self.slots[slot].running for b in s.block_table]
        for r in self._step_ranks():
            self.channels[r].send(msg)
        self.inflight[slot] = (self._step_id, seqs, time.monotonic())

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in getattr(self, "channels", {}).values():
            try:
                ch.send({"t": "shutdown"})
            except OSError:
                pass
        launch.stop(self.procs, timeout=10.0)
        for ch in getattr(self, "channels", {}).values():
            ch.close()
        self._listener.close()

    def cluster(self) -> list[dict]:
        return [{"rank": r, **info} for r, info in sorted(self.worker_info.items())]
