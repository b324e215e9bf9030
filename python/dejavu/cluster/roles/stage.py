"""The stage role: one pipeline stage (one tensor-parallel shard of it) and its KV cache.

Every worker plays it. It loads its layer range, joins its TP group (anew each epoch, with
recovery: parallel/tp_group.py; with `--recovery off` the workers' one torch.distributed world),
and runs steps: the first stage embeds the step's tokens, every other stage receives hidden states
from the same TP rank of the stage before it, and TP rank 0 of the last stage samples and answers.
With swapping, a microbatch's KV is brought in before its step and its new tokens' blocks are
written back after it.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from dataclasses import replace

import torch

from ...engine.kv_cache import PagedKVCache
from ...engine.model_runner import build_metadata
from ...engine.sampler import from_wire, pick, with_logprobs
from ...models import tp
from ...models.loader import load_model, parse_dtype, resolve
from ...models.preload import MEMORY_WAIT_S, PRELOADER, while_memory_frees
from ..messages import ResetDone, StepFailed, SwapStats, Tokens, pack_tokens


def _threads(cfg, device: torch.device) -> int:
    """Intra-op threads: a CPU worker shares the host's cores with the others; a GPU worker's host
    work is small (step metadata, replica updates), so more threads only spin against the launches."""
    n = int(os.environ.get("DEJAVU_WORKER_THREADS", 0))
    if n:
        return n
    return max(1, (os.cpu_count() or 1) // cfg.world) if device.type == "cpu" else 1


class StageRole:
    def __init__(self, ch, cfg, rank: int):
        import torch.distributed as dist

        self.ch, self.rank, self.cfg = ch, rank, cfg
        self.pp, self.tp = cfg.pp, cfg.tp
        self.stage, self.tp_rank = divmod(rank - cfg.first_rank, self.tp)
        start, end = cfg.layers[self.stage]
        self.layer_start = start
        dev = cfg.device
        if dev == "cuda":
            dev = f"cuda:{cfg.local_rank % torch.cuda.device_count()}"  # by its place on its host
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = parse_dtype(cfg.dtype, self.device)
        torch.set_num_threads(_threads(cfg, self.device))
        t_load = time.perf_counter()
        wait_s = MEMORY_WAIT_S if cfg.epoch else 0.0  # a replacement (a recovery's epoch) may wait for memory
        # a standby takes what it holds ready (models/preload.py); weights_from says where it came from
        self.model, self.weights_from = PRELOADER.take(cfg.model, self.device, self.dtype, cfg.seed, (start, end),
                                                       self.tp_rank, self.tp, wait_s)
        if self.model is None:
            self.model = while_memory_frees(lambda: load_model(
                resolve(cfg.model), self.device, self.dtype, seed=cfg.seed, layer_range=(start, end),
                tp_rank=self.tp_rank, tp_size=self.tp), self.device, wait_s)
        mc = self.model.cfg
        t_cache = time.perf_counter()
        self.cache = while_memory_frees(lambda: PagedKVCache(
            end - start, cfg.num_blocks, cfg.block_size, mc.num_kv_heads // self.tp, mc.head_dim, self.dtype,
            self.device), self.device, wait_s)
        t_end = time.perf_counter()
        self.load_s = t_end - t_load  # weights and cache (reported with READY)
        self.parts = {"weights": t_cache - t_load, "cache": t_end - t_cache}
        self._t_inputs = 0.0
        self._decode_step_s: float | None = None
        self.swap = None
        if cfg.swap:
            from ...engine.swap import SwapCache

            self.swap = SwapCache(self.cache.tensor, cfg.swap.host_blocks, cfg.swap.resident)
        self.backend = cfg.backend
        self.hidden = mc.hidden_size
        self.dist = dist
        # Fault tolerance: hidden states travel over our own per-neighbour connections (a dead peer
        # breaks only those), and each TP group is a world of its own (parallel/tp_group.py).
        self.pipes = None
        if cfg.pipes:
            from ...parallel.pipe import StagePipes

            self.pipes = StagePipes(cfg.kv_token, rank, cfg.kv_host, cfg.timeout, on_broken=self._pipe_broken)
        self.tp_group = None
        if cfg.world > 1 and self.pipes is None:  # --recovery off: one world, p2p hidden states, TP subgroups
            dist.init_process_group(self.backend, init_method=f"tcp://{cfg.master}", rank=rank,
                                    world_size=cfg.world, timeout=datetime.timedelta(seconds=cfg.timeout))
            # Every rank creates every TP group, in the same order (new_group is collective).
            groups = [dist.new_group(g) for g in cfg.tp_groups]
            mine = [g for g, ranks in zip(groups, cfg.tp_groups) if rank in ranks]
            if self.tp > 1:
                tp.parallelize(self.model, mine[0])  # the row-parallel layers' all-reduce
        elif self.tp > 1:  # recovery: the TP group alone is a world, formed anew each epoch (set_pipes)
            from ...parallel.tp_group import TPGroup

            self.tp_group = TPGroup(self.model, cfg, rank, host=ch.sock.getpeername()[0])
        self.pending_sends = []
        self.wire_device = self.device if self.backend == "nccl" else torch.device("cpu")
        self.replicator = None  # the replica role's sender (--replicate): a decode step's KV tap
        self.reset_hooks = []   # other roles' part of a reset (the token role drops pushed KV)
        self.tiers = None       # prefix caching's host and disk tiers of this worker's layers
        if cfg.kv_offload is not None:
            from ...engine.block_manager import PrefixStats
            from ...engine.prefix_tiers import PrefixTiers

            o = cfg.kv_offload
            # with swapping the tiers copy to and from the host copy, at the controller's logical block ids
            cache = self.cache if self.swap is None else PagedKVCache.over(self.swap.host)
            self.tiers = PrefixTiers(cache, PrefixStats(), 0, o.disk_dir, 0, host_blocks=o.host_blocks,
                                     disk_blocks=o.disk_blocks, reuse_disk=False)
            self.reset_hooks.append(lambda msg: self.tiers.reset())  # the controller dropped every name

    def handlers(self) -> dict:
        return {"step": self.step, "pipes": self.set_pipes, "reset": self.reset}

    def ready_info(self) -> dict:
        info = {"load_s": self.load_s, "weights": self.weights_from, "parts": self.parts}
        if self.pipes is not None:
            info["pipe_port"] = self.pipes.port
        return info

    def _pipe_broken(self, step_id: int, err: str) -> None:
        """A queued send to the next stage failed (on the pipes' sending thread): that step is lost."""
        try:
            self.ch.send(StepFailed(rank=self.rank, id=step_id, msg=err))
        except OSError:
            pass  # the controller is gone; the main loop exits on its own

    # ------------------------------------------------------------------ forward through this stage
    def forward(self, msg, on_layer=None):
        """This stage's layers over the step's tokens: the last stage's hidden states at each
        sequence's last token, or None where they went on to the next stage."""
        if self.tp_group is not None:
            self.tp_group.check()  # left for a recovery: this step is lost
        items = [(s.ids, s.start, s.blocks) for s in msg.seqs]
        # --replicate: a decode step's new K/V also go to the replicator's ring (after_step sends them);
        # a step that restored blocks is gathered instead (its restored blocks leave with its slots)
        tap = (self.replicator if self.replicator is not None and self.replicator.ring is not None
               and not (msg.tiers and msg.tiers.in_blocks) else None)
        ids, pos, meta, last = build_metadata(items, self.cache.block_size, self.device, tap)
        if self.stage == 0:
            x = ids
        elif self.pipes is not None:
            buf = torch.empty((ids.numel(), self.hidden), dtype=self.dtype, pin_memory=self.device.type == "cuda")
            x = self.pipes.recv(msg.id, buf).to(self.device, non_blocking=True)
        else:
            buf = torch.empty((ids.numel(), self.hidden), dtype=self.dtype, device=self.wire_device)
            self.dist.recv(buf, src=self.rank - self.tp)  # same TP rank, previous stage
            x = buf.to(self.device)
        self._t_inputs = time.perf_counter()  # inputs at hand: what follows is this stage's own work
        h = self.model(x, pos, meta, self.cache.tensor, on_layer=on_layer)
        if self.stage < self.pp - 1 and self.pipes is not None:
            self.pipes.send(msg.id, h)
            return None
        if self.stage < self.pp - 1:
            out = h.to(self.wire_device).contiguous()
            self.pending_sends = [w for w in self.pending_sends if not w[0].is_completed()]
            self.pending_sends.append((self.dist.isend(out, dst=self.rank + self.tp), out))
            return None
        return h[last]

    def sample(self, msg, h) -> dict:
        """The tokens (and logprobs where asked) of a Tokens or Pushed reply."""
        logits = self.model.compute_logits(h)
        seqs = msg.seqs
        params, seen = zip(*(from_wire(s.temp, s.top_k, s.top_p, dataclasses.asdict(s.x) if s.x else None)
                             for s in seqs))
        tokens, lps = pick(logits, list(params), [s.seed for s in seqs], [s.start + len(s.ids) for s in seqs],
                           [s.banned for s in seqs], list(seen))
        ids, logprobs = pack_tokens(with_logprobs(tokens, lps))
        return {"tokens": ids, "logprobs": logprobs}

    @torch.inference_mode()
    def step(self, msg) -> None:
        mapping = touched = None
        t0 = time.perf_counter()
        written = [(s.blocks, s.start, s.start + len(s.ids)) for s in msg.seqs]  # logical blocks
        if msg.tiers is not None and msg.tiers.in_blocks:  # restored blocks reach the replica holders too
            written.append((msg.tiers.in_blocks, 0, len(msg.tiers.in_blocks) * self.cache.block_size))
        if self.swap is not None:
            self.apply_tiers(msg)  # into the host copy, before the step's blocks come in
            # Logical (host) blocks -> this microbatch's device blocks; remember what the new tokens touch.
            mapping = self.swap.acquire(msg.mb, msg.live)
            bs = self.cache.block_size
            touched = sorted({s.blocks[p // bs] for s in msg.seqs
                              for p in range(s.start, s.start + len(s.ids))})
            msg = replace(msg, seqs=[replace(s, blocks=[mapping[b] for b in s.blocks]) for s in msg.seqs])
        try:
            h = self.forward(msg, self.apply_tiers(msg) if self.swap is None else None)
            if h is not None and self.tp_rank == 0:  # the LM head is replicated: TP rank 0 of the last stage answers
                # the previous decode step's time rides along (see below)
                reply = Tokens(mb=msg.mb, id=msg.id, **self.sample(msg, h), step_s=self._decode_step_s)
                self._decode_step_s = None
                self.ch.send(reply)
            if self.replicator is not None and self.swap is None:  # the slots it wrote leave for the holders
                self.replicator.after_step(msg.id, written)
            if h is not None and not msg.prefill:
                # This stage's decode step, from its inputs at hand to the replication enqueued (the
                # sampling synchronised with the device): /metrics and bench replication overhead. It
                # goes with the next step's tokens so that enqueueing stays off the reply's path.
                self._decode_step_s = time.perf_counter() - self._t_inputs
        except BaseException:
            if self.replicator is not None:
                self.replicator.cancel_staged()  # the step never reached after_step
            raise
        finally:
            if self.swap is not None:
                self.swap.write_back(mapping, touched)  # incremental swap-out: only the new tokens' blocks
                self._swap_report(time.perf_counter() - t0)
        if self.swap is not None and self.replicator is not None:
            # Swapping replicates the host copy (replica.py): from there once the write-back landed.
            if self.swap.stream is not None:
                self.swap.stream.synchronize()
            self.replicator.after_step(msg.id, written)

    def apply_tiers(self, msg):
        """The step's (or a prompt worker's prefill's) prefix-tier copies; returns forward()'s on_layer
        that waits for each layer's restore before that layer runs (None without one)."""
        if msg.tiers is None or self.tiers is None:
            return None
        if self.swap is not None:
            # The host copy is what the tiers read and write: earlier write-backs land first, the
            # restore is complete before the step's swap-in, and no region keeps an older device
            # copy of a restored block (it is copied in anew).
            self.swap.host_write([])
            self.tiers.apply_ops(msg.tiers, overlap=False)
            self.swap.host_write(msg.tiers.in_blocks)
            return None
        self.tiers.apply_ops(msg.tiers)
        if self.tiers.pending is None:
            return None
        self.tiers.wait_layer(0)
        return lambda i: self.tiers.wait_layer(i + 1)

    def _swap_report(self, step_s: float) -> None:
        """Every 16 steps: swap counters to the controller (/metrics), and a warning when waiting
        for swap-ins took more than 10% of the step time (PCIe no longer hidden behind compute)."""
        sw = self.swap
        sw.steps += 1
        sw.step_s += step_s
        if sw.steps % 16:
            return
        exposed = sw.wait_s / max(sw.step_s, 1e-9)
        if exposed > 0.10 and not sw.warned:
            sw.warned = True
            print(f"[dejavu worker {self.cfg.worker_name}] swapping is not hidden: {100 * exposed:.0f}% of step "
                  f"time waits for KV to come in (PCIe slower than compute); fewer microbatches per stage or a "
                  f"larger --resident-microbatches would help", file=sys.stderr, flush=True)
        self.ch.send(SwapStats(rank=self.rank, bytes_in=sw.bytes_in, bytes_out=sw.bytes_out, wait_s=sw.wait_s,
                               step_s=sw.step_s))

    def on_arrival(self, msg) -> None:
        """Called by the receiving thread as a message arrives: start bringing the microbatch's KV
        in while the step before it still runs."""
        if self.swap is not None and msg.t == "step":
            self.swap.prefetch(msg.mb, msg.live)
        if msg.t in ("reset", "fenced"):  # a step waiting on a peer that is gone fails now, not after a timeout
            if self.pipes is not None:
                self.pipes.fail()
            if self.tp_group is not None:
                self.tp_group.abort()  # NCCL: a collective waiting on a dead shard returns

    # ------------------------------------------------------------------ fault tolerance
    def reset(self, msg) -> None:
        """A worker failed: drop the pipes (every step still queued fails fast), let replication
        finish what it can, run the other roles' part, then say so."""
        self.fail_links()
        if self.replicator is not None:
            self.replicator.drain()
        for hook in self.reset_hooks:
            hook(msg)
        self.ch.send(ResetDone(rank=self.rank, epoch=msg.epoch))

    def fail_links(self) -> None:
        """This worker's step failed, or a reset came: its pipes fail every step still queued, and
        it leaves its TP group, so a shard waiting in one of the group's collectives fails too."""
        if self.pipes is not None:
            self.pipes.fail()
        if self.tp_group is not None:
            self.tp_group.leave()

    def set_pipes(self, msg) -> None:
        """Neighbours (and replica holders) of a new epoch: connections are made on first use; the TP
        group of the epoch is formed now (every member of it gets the same message)."""
        if self.pipes is not None:
            self.pipes.configure(msg.epoch, msg.prev, msg.next)
        if self.tp_group is not None:
            self.tp_group.join(msg.epoch)
        if self.replicator is not None and msg.holders:
            self.replicator.set_holders(msg.holders)

    def close(self) -> None:
        if self.swap is not None:
            self.swap.close()
        if self.pipes is not None:
            self.pipes.close()
        for w, _ in self.pending_sends:
            w.wait()
        if self.tp_group is not None:
            self.tp_group.leave()
        if self.dist.is_initialized():  # closed after the other roles: the group goes last
            self.dist.destroy_process_group()
