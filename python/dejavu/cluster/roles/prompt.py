"""The prompt role (disaggregation): a stage of the prompt pipeline. It runs prefills only, and after
each layer that layer's KV leaves for the token workers that hold the layer (layer-by-layer
streaming), by CUDA IPC straight into their cache, shared memory on the same host, or TCP. With
prefix caching's offload tiers, the prefill's tier copies (Prefill.tiers) are made first, each
layer's restore waited for just before that layer runs."""
from __future__ import annotations

import os
import time

import torch

from ..messages import Pushed


class PromptRole:
    def __init__(self, stage):
        from ...kvstream import KVStreamer

        self.stage, self.cfg = stage, stage.cfg
        self.streamer = KVStreamer(stage.cache, pool_bytes=self.cfg.kv_pool_bytes)
        self.dests, self.remote, self.transport_used = {}, {}, {}
        self.transfers, self.bandwidth = [], {}

    def handlers(self) -> dict:
        return {"prefill": self.prefill, "peers": self.set_peers}

    def ready_info(self) -> dict:
        return {}

    def set_peers(self, msg) -> None:
        from ...kvstream import TcpDest
        from ...kvstream.ipc import import_tensor
        from ...kvstream.routing import Transfer
        from ...kvstream.select import choose
        from ...kvstream.shm import ShmDest

        device = self.stage.device
        self.transport_used, self.remote = {}, {}
        for w in msg.token_workers:
            kind = choose(w.hostname, self.cfg.kv_transport or "auto", device=device.type)
            if kind == "ipc" and not w.ipc:
                kind = "shm"  # a swapping token worker takes prompt KV into host memory: no cache to map
            self.transport_used[w.worker] = kind
            if kind == "ipc":
                # Mapped into our own device's address space: with the peer on another GPU, our copy
                # kernels write to it over NVLink / PCIe peer access.
                self.remote[w.worker] = (import_tensor(w.ipc, device=device.index), w.num_blocks)
                # High priority: a layer's copy blocks go ahead of the next layers' prefill blocks as
                # SMs free up, instead of queueing behind the whole prefill and draining after it.
                # DEJAVU_KV_STREAM_PRIORITY=normal: the default priority (a baseline for benchmarks).
                normal = os.environ.get("DEJAVU_KV_STREAM_PRIORITY", "high") == "normal"
                self.ipc_stream = torch.cuda.Stream(device, priority=0 if normal else -1)
            elif kind == "shm":
                self.dests[w.worker] = ShmDest(self.cfg.shm_prefix)
            else:
                self.dests[w.worker] = TcpDest(w.host, w.kv_port, self.cfg.kv_token)
        self.bandwidth = {w.worker: self._calibrate(w.worker) for w in msg.token_workers}
        self.transfers = [Transfer(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})
                          for t in msg.transfers]

    def _calibrate(self, worker: str) -> float:
        """Bytes/s of the whole path to `worker` (gather + transport) with nothing else running:
        the reference for "raw" transfer time, against which the exposed time is reported."""
        from ...kvstream import Region

        cache, layout = self.stage.cache, self.streamer.layout
        nblocks = max(1, min(cache.num_blocks, (32 << 20) // (layout.chunk_bytes() * cache.num_layers)))
        region = Region.chunks(range(cache.num_layers), range(nblocks))
        n = region.nbytes(layout)
        best = float("inf")
        if self.transport_used[worker] == "ipc":
            # Reads the peer's cache into a scratch buffer: set_peers also runs after a recovery, when
            # the token caches hold live (or just restored) KV, so nothing of theirs is written.
            remote, _ = self.remote[worker]
            m = min(n // remote.element_size(), remote.numel())
            scratch = torch.empty(m, dtype=remote.dtype, device=self.stage.device)
            n = m * remote.element_size()
        for attempt in range(3):
            key = f"calibrate.{self.cfg.worker_name}.{worker}.{attempt}"
            t0 = time.perf_counter()
            if self.transport_used[worker] == "ipc":
                scratch.copy_(remote[:m])
                torch.cuda.synchronize(self.stage.device)
            else:
                self.streamer.stream_out(region, self.dests[worker], key).wait(self.cfg.timeout)
            best = min(best, time.perf_counter() - t0)
            if self.transport_used[worker] == "shm":
                from ...kvstream.shm import SHM_DIR
                os.unlink(os.path.join(SHM_DIR, self.cfg.shm_prefix + key))
            elif self.transport_used[worker] == "tcp":
                self.dests[worker].clients[0].delete(key)
        return n / best

    @torch.inference_mode()
    def prefill(self, msg) -> None:
        """Prefill, sending each layer's KV to its token worker as soon as it is written."""
        from ... import _C
        from ...kvstream import Region

        stage = self.stage
        device, num_blocks = stage.device, stage.cache.num_blocks
        me = self.cfg.worker_name
        mine = [t for t in self.transfers if t.src == me]
        futures, nbytes, keep = [], 0, []
        per_dst: dict[str, int] = {}
        chunk = self.streamer.layout.chunk_bytes()
        flat = self.streamer.flat

        def on_layer(i):
            nonlocal nbytes
            g = stage.layer_start + i
            after = torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None
            for t in mine:
                if not t.layers[0] <= g < t.layers[1]:
                    continue
                if self.transport_used[t.dst] == "ipc":
                    # Straight into the token worker's cache, at its blocks for these requests.
                    remote, nt = self.remote[t.dst]
                    j = t.dst_layers[0] + (g - t.layers[0])
                    rows = [((i * num_blocks + bp) * chunk, (j * nt + bt) * chunk, chunk)
                            for s in msg.seqs for bp, bt in zip(s.blocks[-len(s.dst_blocks):], s.dst_blocks)]
                    host = torch.tensor(rows, dtype=torch.int64).pin_memory()
                    self.ipc_stream.wait_event(after)
                    with torch.cuda.stream(self.ipc_stream):
                        desc = host.to(device, non_blocking=True)
                        _C.cuda_copy_spans(flat.data_ptr(), remote.data_ptr(), desc.data_ptr(), len(rows),
                                           self.ipc_stream.cuda_stream, chunk)
                    keep.append(desc)
                    nbytes += len(rows) * chunk
                    per_dst[t.dst] = per_dst.get(t.dst, 0) + len(rows) * chunk
                    continue
                for s in msg.seqs:  # the token side's missing blocks: the last len(dst_blocks)
                    region = Region.chunks([i], s.blocks[-len(s.dst_blocks):])
                    key = f"{s.key}.L{g}.{t.dst}"  # unique per receiver: shm names are host-wide
                    futures.append(self._stream_out(region, self.dests[t.dst], key, after, futures))
                    nbytes += region.nbytes(self.streamer.layout)
                    per_dst[t.dst] = per_dst.get(t.dst, 0) + region.nbytes(self.streamer.layout)
        t0 = time.perf_counter()
        # the prompt side's tier copies: a layer's restored blocks are in before it runs (and is sent)
        wait = stage.apply_tiers(msg)
        h = stage.forward(msg, on_layer=on_layer if wait is None else lambda i: (on_layer(i), wait(i)))
        if device.type == "cuda":
            # The last layer has run on the device: from here on the wait is transfer only (the
            # launches above return before the kernels finish).
            torch.cuda.current_stream(device).synchronize()
        compute = time.perf_counter() - t0
        for f in futures:
            f.wait(self.cfg.timeout)
        if keep:
            self.ipc_stream.synchronize()  # the token worker may read its cache once we say "pushed"
        exposed = time.perf_counter() - t0 - compute
        stage.ch.send(Pushed(mb=msg.mb, id=msg.id, rank=stage.rank, bytes=nbytes, exposed_s=exposed,
                             compute_s=compute, raw_s=sum(b / self.bandwidth[d] for d, b in per_dst.items()),
                             transports=sorted({self.transport_used[t.dst] for t in mine}),
                             delivered=sorted({t.dst for t in mine if self.transport_used[t.dst] == "ipc"}),
                             **(stage.sample(msg, h) if h is not None and stage.tp_rank == 0 else {})))

    def _stream_out(self, region, dest, key, after, pending):
        """stream_out, waiting for earlier transfers to return their pool buffers when the pool is full."""
        from ... import _C

        while True:
            try:
                return self.streamer.stream_out(region, dest, key, after=after)
            except _C.PoolFull:
                busy = [f for f in pending if not f.done()]
                if not busy:
                    raise
                busy[0].wait(self.cfg.timeout)

    def close(self) -> None:
        pass
