"""`dejavu worker`: one process holding one pipeline stage (one tensor-parallel shard of it) and
its KV cache.

It connects to the controller (HELLO with the cluster token), receives its configuration, loads
its layer range, joins the workers' torch.distributed group (gloo on CPU, NCCL across GPUs), says
READY (or ERROR with the reason) and then runs what the controller sends, in order. Roles:
  stage   a stage of the FT-style pipeline: prefill and decode steps
  prompt  a stage of the prompt pipeline (disaggregation): prefill only; after each layer, that
          layer's KV leaves for the token workers that hold the layer (layer-by-layer streaming)
  token   a stage of the token pipeline: receives prompts' KV (into a TCP replica store it runs),
          admits them into its cache, then decodes
Within a pipeline, the first stage embeds the step's tokens, every other stage receives hidden
states from the same TP rank of the stage before it, and TP rank 0 of the last stage samples and
answers. A worker exits when told, when its control connection closes, or when its parent dies.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
import dataclasses
from dataclasses import replace

import torch

from ..engine.kv_cache import PagedKVCache
from ..engine.model_runner import build_metadata
from ..engine.sampler import from_wire, pick, with_logprobs
from ..models.loader import load_model, parse_dtype, resolve
from ..cluster.messages import (Admitted, Error, Heartbeat, MessageError, Pushed, Ready, ResetDone, Restored, StepFailed,
                                SwapStats, Tokens, pack_tokens)
from ..parallel.wire import Channel, connect
from .lifecycle import on_deployment_gone, quiet_stop_on_signals, run_deployment_cleanups, watch_parent


def _env_rank() -> int | None:
    from ..cluster.placement import RANK_ENV, env_int

    return env_int(RANK_ENV)  # mpirun, srun, torchrun


class StageWorker:
    def __init__(self, ch: Channel, cfg: dict, rank: int):
        import torch.distributed as dist

        self.ch, self.rank, self.cfg = ch, rank, cfg
        self.role = cfg.role
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
        if self.device.type == "cpu":
            # Share the host's cores among the workers instead of oversubscribing them.
            threads = int(os.environ.get("DEJAVU_WORKER_THREADS", 0)) or max(1, (os.cpu_count() or 1) // cfg.world)
            torch.set_num_threads(threads)
        else:
            # A GPU worker's host-side tensor work is small (step metadata, replica updates): a pool of
            # intra-op threads per process only spins against the threads launching the kernels.
            torch.set_num_threads(int(os.environ.get("DEJAVU_WORKER_THREADS", 0)) or 1)
        t_load = time.perf_counter()
        src = resolve(cfg.model)
        self.model = load_model(src, self.device, self.dtype, seed=cfg.seed, layer_range=(start, end),
                                tp_rank=self.tp_rank, tp_size=self.tp)
        mc = self.model.cfg
        self.cache = PagedKVCache(end - start, cfg.num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim,
                                  self.dtype, self.device)
        self.load_s = time.perf_counter() - t_load  # weights and cache (reported with READY)
        self._t_inputs = 0.0
        self._decode_step_s: float | None = None
        self.swap = None
        if cfg.swap:
            from ..engine.swap import SwapCache

            self.swap = SwapCache(self.cache.tensor, cfg.swap.host_blocks, cfg.swap.resident)
        self.backend = cfg.backend
        self.hidden = mc.hidden_size
        self.dist = dist
        # Fault tolerance: hidden states travel over our own per-neighbour connections (a dead peer
        # breaks only those); torch.distributed is then needed only for tensor parallelism.
        self.pipes = None
        if cfg.pipes:
            from ..parallel.pipe import StagePipes

            self.pipes = StagePipes(cfg.kv_token, rank, cfg.kv_host, cfg.timeout,
                                    on_broken=self._pipe_broken)
        if cfg.world > 1 and (self.pipes is None or self.tp > 1):
            dist.init_process_group(self.backend, init_method=f"tcp://{cfg.master}", rank=rank,
                                    world_size=cfg.world, timeout=datetime.timedelta(seconds=cfg.timeout))
            # Every rank creates every TP group, in the same order (new_group is collective).
            groups = [dist.new_group(g) for g in cfg.tp_groups]
            mine = [g for g, ranks in zip(groups, cfg.tp_groups) if rank in ranks]
            if self.tp > 1:
                self.model.set_tp_group(mine[0])
        self.pending_sends = []
        self.wire_device = self.device if self.backend == "nccl" else torch.device("cpu")
        self.streamer = None
        self.kv_server = None
        self.dests = {}
        rep = cfg.replicate
        if self.role in ("prompt", "token"):  # disaggregation's KV streams (replication has its own sender)
            from ..kvstream import KVStreamer, TcpReplicaServer

            self.streamer = KVStreamer(self.cache, pool_bytes=cfg.kv_pool_bytes)
            if self.role == "token":
                self.kv_server = TcpReplicaServer(cfg.kv_token, host=cfg.kv_host)
        # --replicate: hold the replicas of other workers (ReplicaServer) and send ours (Replicator).
        self.replica_server = self.replicator = None
        if rep:
            from ..kvstream.replica import ReplicaServer
            from .replication import Replicator

            self.replica_server = ReplicaServer(cfg.kv_token, cfg.kv_host, rep.dir,
                                                prefix=rep.prefix)
            self.replicator = Replicator(self, cfg.worker_name)

    def ready_info(self) -> dict:
        info = {"load_s": self.load_s}
        if self.pipes is not None:
            info["pipe_port"] = self.pipes.port
        if self.replica_server is not None:
            info["replica_port"] = self.replica_server.port
        if not self.kv_server:
            return info
        info["kv_port"] = self.kv_server.port
        if self.device.type == "cuda" and self.swap is None:  # same-host prompt workers may write into this cache
            from ..kvstream.ipc import export_tensor

            info["ipc"] = export_tensor(self.cache.tensor)
        return info

    def _pipe_broken(self, step_id: int, err: str) -> None:
        """A queued send to the next stage failed (on the pipes' sending thread): that step is lost."""
        try:
            self.ch.send(StepFailed(rank=self.rank, id=step_id, msg=err))
        except OSError:
            pass  # the controller is gone; the main loop exits on its own

    # ------------------------------------------------------------------ forward through this stage
    def _forward(self, msg: dict, on_layer=None):
        items = [(s.ids, s.start, s.blocks) for s in msg.seqs]
        # --replicate: a decode step's new K/V also go to the replicator's ring (after_step sends them)
        tap = self.replicator if self.replicator is not None and self.replicator.ring is not None else None
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

    def _sample(self, msg, h) -> dict:
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
    def step(self, msg: dict) -> None:
        mapping = touched = None
        t0 = time.perf_counter()
        if self.swap is not None:
            # Logical (host) blocks -> this microbatch's device blocks; remember what the new tokens touch.
            mapping = self.swap.acquire(msg.mb, msg.live)
            bs = self.cache.block_size
            touched = sorted({s.blocks[p // bs] for s in msg.seqs
                              for p in range(s.start, s.start + len(s.ids))})
            msg = replace(msg, seqs=[replace(s, blocks=[mapping[b] for b in s.blocks]) for s in msg.seqs])
        try:
            h = self._forward(msg)
            if h is not None and self.tp_rank == 0:  # the LM head is replicated: TP rank 0 of the last stage answers
                # the previous decode step's time rides along (see below)
                reply = Tokens(mb=msg.mb, id=msg.id, **self._sample(msg, h), step_s=self._decode_step_s)
                self._decode_step_s = None
                self.ch.send(reply)
            if self.replicator is not None:  # the token slots this step wrote leave for the replica holder
                self.replicator.after_step(msg.id, [(s.blocks, s.start, s.start + len(s.ids))
                                                       for s in msg.seqs])
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

    def on_arrival(self, msg: dict) -> None:
        """Called by the receiving thread as a message arrives: start bringing the microbatch's KV
        in while the step before it still runs."""
        if self.swap is not None and msg.t == "step":
            self.swap.prefetch(msg.mb, msg.live)
        if self.pipes is not None and msg.t in ("reset", "fenced"):
            self.pipes.fail()  # a step waiting on a peer that is gone fails now, not after a timeout

    # ------------------------------------------------------------------ disaggregation
    def set_peers(self, msg: dict) -> None:
        from ..kvstream import TcpDest
        from ..kvstream.select import choose
        from ..kvstream.shm import ShmDest

        from ..kvstream.ipc import import_tensor

        self.transport_used = {}
        self.remote = {}
        for w in msg.token_workers:
            kind = choose(w.hostname, self.cfg.kv_transport or "auto", device=self.device.type)
            if kind == "ipc" and not w.ipc:
                kind = "shm"  # a swapping token worker takes prompt KV into host memory: no cache to map
            self.transport_used[w.worker] = kind
            if kind == "ipc":
                # Mapped into our own device's address space: with the peer on another GPU, our copy
                # kernels write to it over NVLink / PCIe peer access.
                self.remote[w.worker] = (import_tensor(w.ipc, device=self.device.index), w.num_blocks)
                # High priority: a layer's copy blocks go ahead of the next layers' prefill blocks as
                # SMs free up, instead of queueing behind the whole prefill and draining after it.
                # DEJAVU_KV_STREAM_PRIORITY=normal: the default priority (a baseline for benchmarks).
                normal = os.environ.get("DEJAVU_KV_STREAM_PRIORITY", "high") == "normal"
                self.ipc_stream = torch.cuda.Stream(self.device, priority=0 if normal else -1)
            elif kind == "shm":
                self.dests[w.worker] = ShmDest(self.cfg.shm_prefix)
            else:
                self.dests[w.worker] = TcpDest(w.host, w.kv_port, self.cfg.kv_token)
        self.bandwidth = {w.worker: self._calibrate(w.worker) for w in msg.token_workers}
        from ..kvstream.routing import Transfer

        self.transfers = [Transfer(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
                          for t in msg.transfers]

    def _calibrate(self, worker: str) -> float:
        """Bytes/s of the whole path to `worker` (gather + transport) with nothing else running:
        the reference for "raw" transfer time, against which the exposed time is reported."""
        from ..kvstream import Region

        layout = self.streamer.layout
        nblocks = max(1, min(self.cache.num_blocks, (32 << 20) // (layout.chunk_bytes() * self.cache.num_layers)))
        region = Region.chunks(range(self.cache.num_layers), range(nblocks))
        n = region.nbytes(layout)
        best = float("inf")
        for attempt in range(3):
            key = f"calibrate.{self.cfg.worker_name}.{worker}.{attempt}"
            t0 = time.perf_counter()
            if self.transport_used[worker] == "ipc":
                remote, _ = self.remote[worker]
                m = min(n, remote.numel(), self.streamer.flat.numel())
                remote[:m].copy_(self.streamer.flat[:m])  # the token cache holds nothing yet
                torch.cuda.synchronize(self.device)
            else:
                self.streamer.stream_out(region, self.dests[worker], key).wait(self.cfg.timeout)
            best = min(best, time.perf_counter() - t0)
            if self.transport_used[worker] == "shm":
                from ..kvstream.shm import SHM_DIR
                os.unlink(os.path.join(SHM_DIR, self.cfg.shm_prefix + key))
            elif self.transport_used[worker] == "tcp":
                self.dests[worker].clients[0].delete(key)
        return n / best

    @torch.inference_mode()
    def prefill(self, msg: dict) -> None:
        """Prompt side: prefill, sending each layer's KV to its token worker as soon as it is written."""
        from ..kvstream import Region

        from .. import _C

        me = self.cfg.worker_name
        mine = [t for t in self.transfers if t.src == me]
        futures, nbytes, keep = [], 0, []
        per_dst: dict[str, int] = {}
        chunk = self.streamer.layout.chunk_bytes()
        flat = self.streamer.flat

        def on_layer(i):
            nonlocal nbytes
            g = self.layer_start + i
            after = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
            for t in mine:
                if not t.layers[0] <= g < t.layers[1]:
                    continue
                if self.transport_used[t.dst] == "ipc":
                    # Straight into the token worker's cache, at its blocks for these requests.
                    remote, nt = self.remote[t.dst]
                    j = t.dst_layers[0] + (g - t.layers[0])
                    rows = [((i * self.cache.num_blocks + bp) * chunk, (j * nt + bt) * chunk, chunk)
                            for s in msg.seqs for bp, bt in zip(s.blocks, s.dst_blocks)]
                    host = torch.tensor(rows, dtype=torch.int64).pin_memory()
                    self.ipc_stream.wait_event(after)
                    with torch.cuda.stream(self.ipc_stream):
                        desc = host.to(self.device, non_blocking=True)
                        _C.cuda_copy_spans(flat.data_ptr(), remote.data_ptr(), desc.data_ptr(), len(rows),
                                           self.ipc_stream.cuda_stream, chunk)
                    keep.append(desc)
                    nbytes += len(rows) * chunk
                    per_dst[t.dst] = per_dst.get(t.dst, 0) + len(rows) * chunk
                    continue
                for s in msg.seqs:
                    region = Region.chunks([i], s.blocks)
                    key = f"{s.key}.L{g}.{t.dst}"  # unique per receiver: shm names are host-wide
                    futures.append(self._stream_out(region, self.dests[t.dst], key, after, futures))
                    nbytes += region.nbytes(self.streamer.layout)
                    per_dst[t.dst] = per_dst.get(t.dst, 0) + region.nbytes(self.streamer.layout)
        t0 = time.perf_counter()
        h = self._forward(msg, on_layer=on_layer)
        if self.device.type == "cuda":
            # The last layer has run on the device: from here on the wait is transfer only (the
            # launches above return before the kernels finish).
            torch.cuda.current_stream(self.device).synchronize()
        compute = time.perf_counter() - t0
        for f in futures:
            f.wait(self.cfg.timeout)
        if keep:
            self.ipc_stream.synchronize()  # the token worker may read its cache once we say "pushed"
        exposed = time.perf_counter() - t0 - compute
        self.ch.send(Pushed(mb=msg.mb, id=msg.id, rank=self.rank, bytes=nbytes, exposed_s=exposed, compute_s=compute,
                            raw_s=sum(b / self.bandwidth[d] for d, b in per_dst.items()),
                            transports=sorted({self.transport_used[t.dst] for t in mine}),
                            delivered=sorted({t.dst for t in mine if self.transport_used[t.dst] == "ipc"}),
                            **(self._sample(msg, h) if h is not None and self.tp_rank == 0 else {})))

    def _stream_out(self, region, dest, key, after, pending):
        """stream_out, waiting for earlier transfers to return their pool buffers when the pool is full."""
        from .. import _C

        while True:
            try:
                return self.streamer.stream_out(region, dest, key, after=after)
            except _C.PoolFull:
                busy = [f for f in pending if not f.done()]
                if not busy:
                    raise
                busy[0].wait(self.cfg.timeout)

    @torch.inference_mode()
    def admit(self, msg: dict) -> None:
        """Token side: move arrived prompt KV from the receive store into this worker's cache."""
        from ..kvstream import Region

        from ..kvstream.shm import ShmDest

        shm = ShmDest(self.cfg.shm_prefix)
        nbytes = 0
        t0 = time.perf_counter()
        if self.swap is not None:  # into the host copy, where the microbatch's swap-ins read it
            self.swap.host_write([b for s in msg.seqs for b in s.blocks])
        if self.cfg.worker_name in msg.delivered:
            # Written straight into this cache by the prompt workers (CUDA IPC), already complete.
            chunk = self.streamer.layout.chunk_bytes()
            nbytes = sum(len(s.blocks) for s in msg.seqs) * self.cache.num_layers * chunk
            self.ch.send(Admitted(id=msg.id, rank=self.rank, bytes=nbytes, seconds=time.perf_counter() - t0))
            self._replicate_admitted(msg)
            return
        for s in msg.seqs:
            for i in range(self.cache.num_layers):
                key = f"{s.key}.L{self.layer_start + i}.{self.cfg.worker_name}"
                region = Region.chunks([i], s.blocks)
                n = region.nbytes(self.streamer.layout)
                buf = self.streamer.pool.alloc(n)
                try:
                    if shm.size(key) >= 0:  # a same-host prompt worker left it in shared memory
                        got = shm.size(key)
                        shm.get(key, buf.tensor).wait(self.cfg.timeout)
                    else:                   # else it came over TCP into the receive store
                        got = self.kv_server.get_into(key, buf.tensor)
                        self.kv_server.server.erase(key)
                    if got != n:
                        raise RuntimeError(f"KV chunk {key} has {got} bytes, expected {n}")
                    if self.swap is not None:
                        host = self.swap.host[i]  # [host blocks, 2, block_size, kv_heads, head_dim]
                        x = buf.tensor[:n].view(host.dtype).view((len(s.blocks),) + tuple(host.shape[1:]))
                        host.index_copy_(0, torch.tensor(s.blocks), x)
                    else:
                        self.streamer.scatter(region, buf.tensor).wait(self.cfg.timeout)
                finally:
                    buf.free()
                nbytes += n
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ch.send(Admitted(id=msg.id, rank=self.rank, bytes=nbytes, seconds=time.perf_counter() - t0))
        self._replicate_admitted(msg)

    def _replicate_admitted(self, msg: dict) -> None:
        """The prompt KV just admitted goes to the replica holder as well (positions [0, ntok))."""
        if self.replicator is not None:
            self.replicator.cancel_staged()  # these slots were not written by a step's kernels
            self.replicator.after_step(msg.id, [(s.blocks, 0, s.ntok) for s in msg.seqs])

    # ------------------------------------------------------------------ fault tolerance
    def reset(self, msg: dict) -> None:
        """A worker failed: drop the pipes (every step still queued fails fast), let replication
        finish what it can, forget KV pushed for prefills that will be redone, then say so."""
        if self.pipes is not None:
            self.pipes.fail()
        if self.replicator is not None:
            self.replicator.drain()
        prefixes = [k + "." for k in msg.drop_keys]
        if prefixes and self.kv_server is not None:
            for key in self.kv_server.server.keys():
                if any(key.startswith(p) for p in prefixes):
                    self.kv_server.server.erase(key)
            from ..kvstream.shm import SHM_DIR

            base = self.cfg.shm_prefix
            for name in os.listdir(SHM_DIR):
                if name.startswith(base) and any(name[len(base):].startswith(p) for p in prefixes):
                    try:
                        os.unlink(os.path.join(SHM_DIR, name))
                    except OSError:
                        pass
        self.ch.send(ResetDone(rank=self.rank, epoch=msg.epoch))

    def set_pipes(self, msg: dict) -> None:
        """Neighbours (and replica holder) of a new epoch: connections are made on first use."""
        if self.pipes is not None:
            self.pipes.configure(msg.epoch, msg.prev, msg.next)
        if self.replicator is not None and msg.holder:
            self.replicator.set_holder(msg.holder)

    @torch.inference_mode()
    def restore(self, msg: dict) -> None:
        """A replacement worker: fetch this stage's KV from the replica holder into the cache. A
        slot below a request's watermark whose checksum fails marks the request bad (recomputed)."""
        from ..kvstream.replica import ReplicaClient, ReplicaError, block_checksums, mac_key

        t0 = time.perf_counter()
        blocks = msg.blocks
        bad, nbytes, error = [], 0, None
        try:
            if blocks:
                client = ReplicaClient(msg.holder[0], int(msg.holder[1]), self.cfg.kv_token,
                                       timeout=self.cfg.timeout)
                try:
                    data, chk = client.get_blocks(self.cfg.worker_name, blocks)
                finally:
                    client.close()
                shape = (self.cache.num_layers, len(blocks)) + tuple(self.cache.tensor.shape[2:])
                x = data.view(self.cache.dtype).view(shape)
                # Replicas kept on disk carry MACs (replica.py): verified with the key, never trusted as they are.
                on_disk = bool(self.cfg.replicate is not None and self.cfg.replicate.dir)
                key = mac_key(self.cfg.kv_token, self.cfg.worker_name) if on_disk else None
                good = block_checksums(x, blocks, key) == chk.view(len(blocks), -1)
                # Never let a corrupted slot into the cache (garbage such as NaN would leak through masked
                # attention); those of live requests are recomputed anyway.
                if not bool(good.all()):
                    x.permute(1, 3, 0, 2, 4, 5)[~good] = 0
                ok = good.tolist()
                at = {b: i for i, b in enumerate(blocks)}
                bs = self.cache.block_size
                for r in msg.seqs:
                    sid, table, w = r.seq_id, r.blocks, r.watermark
                    if not all(ok[at[table[p // bs]]][p % bs] for p in range(w)):
                        bad.append(sid)
                idx = torch.as_tensor(blocks, dtype=torch.long, device=self.device)
                self.cache.tensor.index_copy_(1, idx, x.to(self.device))
                nbytes = data.numel()
        except (OSError, ReplicaError) as e:
            error = f"{type(e).__name__}: {e}"
            bad = [r.seq_id for r in msg.seqs]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ch.send(Restored(rank=self.rank, bad=bad, bytes=nbytes, seconds=time.perf_counter() - t0, error=error))

    def set_replication(self, msg: dict) -> None:
        """Pause / resume (between requests; PipelineEngine.set_replication)."""
        if self.replicator is not None:
            self.replicator.paused = not msg.on
            self.replicator.every = max(1, msg.every)

    def rereplicate(self, msg: dict) -> None:
        """Our holder was replaced: re-seed it with every live block."""
        self.replicator.send_blocks(msg.id, msg.blocks)

    def close(self):
        if self.swap is not None:
            self.swap.close()
        if self.pipes is not None:
            self.pipes.close()
        if self.replica_server is not None:
            self.replica_server.stop(remove_files=True)  # a clean shutdown: no replica outlives the deployment
        for w, _ in self.pending_sends:
            w.wait()
        if self.kv_server is not None:
            self.kv_server.stop()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _parent_exits(parent: int, wait: float = 1.0) -> bool:
    """Whether `parent` is exiting (we are handed to another parent) within `wait` seconds."""
    deadline = time.monotonic() + wait
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _receiver(ch: Channel, worker: StageWorker):
    """Messages read on their own thread (so a step's swap-in starts as it arrives), in order."""
    import queue

    inbox: queue.Queue = queue.Queue()

    def loop():
        try:
            while True:
                msg = ch.recv(None)
                try:
                    worker.on_arrival(msg)
                except Exception as e:  # noqa: BLE001 - the main loop reports it
                    inbox.put(e)
                inbox.put(msg)
                if msg.t == "shutdown":
                    return
        except (ConnectionError, OSError) as e:
            inbox.put(ConnectionError(str(e)))
    threading.Thread(target=loop, daemon=True, name="receiver").start()
    return inbox


def _heartbeat(ch: Channel, rank_of, interval: float) -> None:
    """Tell the controller we are alive every `interval` seconds (also while loading weights)."""
    def loop():
        while True:
            time.sleep(interval)
            try:
                ch.send(Heartbeat(rank=rank_of()))
            except OSError:
                return
    threading.Thread(target=loop, daemon=True, name="heartbeat").start()


def run(controller: str, token: str, rank: int | None = None, standby: bool = False,
        advertise: str | None = None) -> int:
    from ..cluster.placement import worker_identity
    from ..kvstream.net import parse_host_port

    host, port = parse_host_port(controller)
    rank = rank if rank is not None else _env_rank()  # None: the controller assigns one
    quiet_stop_on_signals()  # a stop signal is not a failure: lifecycle.py
    parent = int(os.environ.get("DEJAVU_PARENT_PID") or 0)
    if parent:
        watch_parent(parent)
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack (a hung worker)
    # The thread running steps must get the GIL back quickly from the helpers (replication,
    # replica holder, pipes, heartbeats): Python's default 5 ms switch interval can hold a kernel
    # launch back for most of a GPU decode step.
    sys.setswitchinterval(float(os.environ.get("DEJAVU_SWITCH_INTERVAL", "0.0005")))
    hello = {"pid": os.getpid(), "host": socket.gethostname(), **worker_identity(host, port, advertise)}
    hello.update({"standby": True} if standby else {"rank": rank})
    # a worker started by hand may come up before its controller listens
    ch = connect(host, port, token, hello, wait=float(os.environ.get("DEJAVU_CONNECT_WAIT", "60")))
    if standby:
        if os.environ.get("DEJAVU_STANDBY_DEVICE") == "cuda" and torch.cuda.is_available():
            # A warm spare: the CUDA context of every GPU it may be sent to exists before it is needed.
            for i in range(torch.cuda.device_count()):
                torch.zeros(1, device=f"cuda:{i}")
        print(f"dejavu worker: standing by for {controller}", file=sys.stderr, flush=True)
    cfg = ch.recv(timeout=None if standby else 600)
    if cfg.t != "config":
        return 2
    rank, epoch = cfg.rank, cfg.epoch
    ch.stamp = lambda: epoch  # what we send carries the latest epoch we heard of
    if cfg.shm_prefix:  # the deployment's /dev/shm segments go with it
        from ..kvstream.shm import retire

        on_deployment_gone(lambda: retire(cfg.shm_prefix))
    if cfg.heartbeat_interval:
        _heartbeat(ch, lambda: rank, float(cfg.heartbeat_interval))
    try:
        worker = StageWorker(ch, cfg, rank)
    except Exception as e:  # noqa: BLE001 - reported to the controller, which stops everyone
        ch.send(Error(rank=rank, msg=f"{type(e).__name__}: {e}"))
        return 1
    ch.send(Ready(rank=rank, **worker.ready_info()))
    handlers = {"step": worker.step, "prefill": worker.prefill, "admit": worker.admit, "peers": worker.set_peers,
                "reset": worker.reset, "pipes": worker.set_pipes, "restore": worker.restore,
                "rereplicate": worker.rereplicate, "replication": worker.set_replication}
    from ..kvstream import StreamError
    from ..parallel.pipe import PipeBroken

    inbox = _receiver(ch, worker) if worker.swap is not None or worker.pipes is not None else None
    try:
        while True:
            msg = ch.recv(None) if inbox is None else inbox.get()
            if isinstance(msg, BaseException):
                raise msg
            if msg.epoch < epoch:  # fencing: from before an epoch we already are in
                print(f"dejavu worker: refused {msg.t!r} of epoch {msg.epoch} (now {epoch})", file=sys.stderr)
                continue
            epoch = msg.epoch
            if msg.t == "fenced":  # our rank went to another worker while we were cut off
                print(f"dejavu worker: fenced: rank {rank} was given to another worker in epoch {epoch}; "
                      f"stopping", file=sys.stderr, flush=True)
                return 5
            if msg.t == "shutdown":
                break
            handler = handlers.get(msg.t)
            if handler is None:
                continue
            try:
                handler(msg)
            except (PipeBroken, StreamError) as e:
                if worker.pipes is None:
                    raise
                # A neighbour (or a KV peer) died: this step is lost; the controller resets and replays.
                worker.pipes.fail()
                ch.send(StepFailed(rank=rank, id=getattr(msg, "id", 0), msg=str(e)))
    except MessageError as e:  # the controller sent something this worker cannot read
        try:
            ch.send(Error(rank=rank, msg=str(e)))
        except OSError:
            pass
        return 1
    except ConnectionError:
        if parent and _parent_exits(parent):
            run_deployment_cleanups()
        return 4  # the controller is gone: nothing to serve
    except Exception as e:  # noqa: BLE001
        try:
            ch.send(Error(rank=rank, msg=f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return 1
    finally:
        ch.close()
    worker.close()
    return 0
