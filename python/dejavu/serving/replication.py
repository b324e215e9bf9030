"""Worker side of `--replicate`: stream the KV this worker writes to its replica holder.

After every step (and every disaggregated admission) the token slots the step wrote leave for the
holder's ReplicaServer, which applies them to its mirror of this worker's cache.

Decode steps go through the step ring: the metadata of the step (model_runner.build_metadata, or
the captured decode graphs) names a ring row for each new token, reserved by `stage`, and the
step's write-KV kernel stores the token's K and V there too, in pinned host memory, besides the
cache. `after_step` then commits the step, and DéjàVuLib's sending thread sends the rows as they lie
once the step's event completed: no gather, no second stream, no copy beyond the kernel's own
stores. DEJAVU_REPLICA_RING=0 turns the ring off. The ring holds an eighth of the cache's tokens, at
most DEJAVU_REPLICA_RING_MIB (512) and at least 256 tokens. A step that finds the ring full, and
every other step, goes the gather way: the step only hands the slots (and, on CUDA, an event
recorded after the step's work) to DéjàVuLib's ReplicaSender (csrc/kvstream/replica_sender.cpp): a
C++ thread that gathers them into pinned host memory (with the copy engine, ordered after that
event and lagged by one step; memcpy for a host cache), checksums and sends them, holding no
interpreter lock, so it never competes with the step loop for it. (Gathering a slot after later steps ran is safe: a request's KV slots are written once, and a
block freed and reused meanwhile is re-sent by its new owner later in the same FIFO queue.) Once the
holder acknowledged, a small Python thread tells the controller "replicated <step>" (it wakes for a
batch of acknowledgements at a time); the controller advances each request's watermark when every
stage of the step has acknowledged. Nothing here blocks the step itself; the queue is FIFO, so
acknowledgements arrive in step order and a watermark is always a prefix.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import torch

from .. import _C, kernels
from ..cluster.messages import KINDS
from ..models.layers import KVRing
from ..models.preload import PRELOADER


class Replicator:
    LINGER_S = 0.05      # every > 1: how long a batch waits for the next step before it leaves anyway
    ACK_LINGER_S = 0.01  # acknowledgements are forwarded in batches gathered over this long
    LAG_S = 0.002        # the longest a step's slots wait for the next step before they are gathered

    def __init__(self, worker, src: str, holder: int = 0, cache=None, ring: bool = True):
        """`holder`: which of the worker's holders this one sends to (its acknowledgements say so);
        `cache`: what is replicated (default the worker's cache; with swapping its host copy);
        `ring`: tap decode steps through a ring (one sender of a worker may)."""
        self.w, self.src, self.holder = worker, src, holder
        cache = cache if cache is not None else worker.cache
        self.paused = False  # Controller.set_replication (between requests only)
        self._every = 1
        dev = cache.tensor.device
        self._cuda = dev.type == "cuda"
        self._device_index = (dev.index if dev.index is not None else torch.cuda.current_device()) if self._cuda else -1
        self.native = _C.ReplicaSender(cache.layout(), cache.tensor.data_ptr(), self._device_index,
                                       src, worker.cfg.kv_token, str(cache.dtype).replace("torch.", ""),
                                       float(worker.cfg.timeout))
        self.native.set_every(1, self.LINGER_S)
        # A step's slots are gathered once the next step was handed over (at most LAG_S later): the copy
        # then runs beside that step's compute, not at the step boundary where the sampled tokens
        # are read back. DEJAVU_REPLICA_LAG_S=0 gathers at once (bench decode --replicate compares).
        self.native.set_lag(float(os.environ.get("DEJAVU_REPLICA_LAG_S", self.LAG_S)))
        self.ring = self._make_ring(cache) if ring else None
        self._staged = False  # a ring reservation awaits this step's after_step
        self._forwarded = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._forward, daemon=True, name="replication-acks")
        self._thread.start()
        # Before the interpreter finalizes: a daemon thread still waiting inside C++ then would be
        # torn down mid-call (std::terminate in pybind11's lock release).
        atexit.register(self.close)

    # ------------------------------------------------------------------ called by the main thread
    @property
    def every(self) -> int:
        """Steps per gather and send (set_replication(every=)); the watermark trails by up to every - 1."""
        return self._every

    @every.setter
    def every(self, n: int) -> None:
        self._every = max(1, int(n))
        self.native.set_every(self._every, self.LINGER_S)

    @property
    def bytes(self) -> int:
        return self.native.bytes()

    def set_holder(self, addr) -> None:
        self.native.set_holder(str(addr[0]), int(addr[1]))

    def _make_ring(self, cache) -> KVRing | None:
        budget = ring_budget(cache.tensor.numel() * cache.tensor.element_size())
        if not budget:
            return None
        if self._cuda and not kernels.usable(cache.tensor, cache.head_dim):
            return None  # the torch write path would copy to the host synchronously: gather instead
        row = 2 * cache.num_layers * cache.num_kv_heads * cache.head_dim * cache.tensor.element_size()
        rows = max(256, budget // row)
        shape = (cache.num_layers, rows, 2, cache.num_kv_heads, cache.head_dim)
        # a standby allocated its pinned ring ahead (pinning hundreds of MiB is slow): models/preload.py
        t = PRELOADER.take_pinned(shape, cache.dtype) if self._cuda else None
        if t is None:
            t = torch.empty(shape, dtype=cache.dtype, pin_memory=self._cuda)
        self.native.ring_attach(t.data_ptr(), rows)
        return KVRing(t, cache.tensor)

    def stage(self, blocks, slots) -> int:
        """A decode step is about to write new tokens at (blocks[i], slots[i]) (int64 arrays): the
        first of the ring rows reserved for them, or -1 (no ring, paused, ring full)."""
        if self.ring is None or self.paused:
            return -1
        first = self.native.ring_stage(blocks, slots)
        self._staged = first >= 0
        return first

    def cancel_staged(self) -> None:
        """This step writes no ring rows: a reservation left by a step that never reached after_step
        is taken back (its rows would otherwise go out under this step's id)."""
        if self._staged:
            self.native.ring_cancel()
            self._staged = False

    @property
    def ring_misses(self) -> int:
        return self.native.ring_misses()

    def after_step(self, step_id: int, written: list[tuple[list[int], int, int]]) -> None:
        """A step wrote positions [start, end) of each (block table, start, end): send those slots
        (the ring rows it staged, or a gather of them)."""
        if self.paused:
            return
        stream = self._stream()
        if self._staged:
            self._staged = False
            if self.native.ring_commit(step_id, sum(e - s for _, s, e in written), stream):
                return
        self.native.push_slots(step_id, written, stream)

    def send_blocks(self, tag: int, blocks: list[int]) -> None:
        """Re-seed the holder with whole blocks (its mirror was lost with the previous holder)."""
        self.native.push_blocks(tag, blocks, self._stream())

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued was sent (or failed) and its acknowledgements forwarded."""
        deadline = time.monotonic() + (timeout if timeout is not None else float(self.w.cfg.timeout) * 4)
        if not self.native.drain(max(0.0, deadline - time.monotonic())):
            return False
        want = self.native.events_total()
        with self._cond:
            return self._cond.wait_for(lambda: self._forwarded >= want, max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._closed = True
        self.native.close()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _stream(self) -> int:
        """The stream whose work so far wrote the slots (the gather is ordered after it)."""
        if not self._cuda:
            return 0
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the handle without a Stream object
        if raw is not None:
            return raw(self._device_index)
        return torch.cuda.current_stream(self.w.device).cuda_stream

    # ------------------------------------------------------------------ the acknowledging thread
    def _forward(self) -> None:
        while True:
            events = self.native.wait_events(1.0, self.ACK_LINGER_S)
            if not events and self._closed:
                return
            for ev in events:
                if ev.kind == "failed":
                    # The holder is gone (or refused), or a bad step: replication to it stops; the
                    # controller replaces the holder, and the watermarks stay at the last acknowledgement.
                    print(f"[dejavu worker {self.src}] replication to its holder failed: {ev.error}",
                          file=sys.stderr, flush=True)
                else:
                    self._ack(ev.kind, ev.tag, ev.bytes, ev.error or None)
            with self._cond:
                self._forwarded += len(events)
                self._cond.notify_all()

    def _ack(self, kind: str, tag: int, nbytes: int, error: str | None = None) -> None:
        msg = KINDS[kind](rank=self.w.rank, id=tag, bytes=nbytes, error=error, holder=self.holder)  # (re)replicated
        try:
            self.w.ch.send(msg)
        except OSError:
            pass  # the controller is gone; the main loop exits on its own


def ring_budget(kv_bytes: int) -> int:
    """Bytes of a cache of `kv_bytes` that the step ring holds (0: no ring): an eighth of it (rows
    absorb the sender falling behind for a while), at most DEJAVU_REPLICA_RING_MIB; the ring keeps
    at least 256 tokens whatever this says."""
    mib = float(os.environ.get("DEJAVU_REPLICA_RING_MIB", "512"))
    if os.environ.get("DEJAVU_REPLICA_RING", "1") == "0" or mib <= 0:
        return 0
    return min(int(mib * (1 << 20)), kv_bytes // 8)


def replica_src(worker_name: str, holder: int) -> str:
    """The name of a worker's mirror at its `holder`-th holder (distinct, as holders may share a
    replica directory)."""
    return worker_name if holder == 0 else f"{worker_name}.r{holder}"


class Replicators:
    """A worker's senders, one per replica holder (`--replicas`), behind one sender's interface:
    every step's slots go to each holder; only the first sender taps decode steps through a ring
    (the others gather)."""

    def __init__(self, senders: list[Replicator]):
        self.all, self.first = senders, senders[0]

    @property
    def ring(self):
        return self.first.ring

    @property
    def paused(self) -> bool:
        return self.first.paused

    @paused.setter
    def paused(self, v: bool) -> None:
        for r in self.all:
            r.paused = v

    @property
    def every(self) -> int:
        return self.first.every

    @every.setter
    def every(self, n: int) -> None:
        for r in self.all:
            r.every = n

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.all)

    def stage(self, blocks, slots) -> int:
        return self.first.stage(blocks, slots)

    def cancel_staged(self) -> None:
        self.first.cancel_staged()

    def after_step(self, step_id: int, written) -> None:
        for r in self.all:
            r.after_step(step_id, written)

    def set_holders(self, addrs: list) -> None:
        for r, addr in zip(self.all, addrs):
            r.set_holder(addr)

    def drain(self, timeout: float | None = None) -> bool:
        return all([r.drain(timeout) for r in self.all])

    def close(self) -> None:
        for r in self.all:
            r.close()
