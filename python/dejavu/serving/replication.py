"""Worker side of `--replicate`: stream the KV this worker writes to its replica holder.

After every step (and every disaggregated admission) the token slots the step wrote leave for the
holder's ReplicaServer, which applies them to its mirror of this worker's cache. The step itself
only hands the slots (and, on CUDA, an event recorded after the step's work) to DéjàVuLib's
ReplicaSender (csrc/kvstream/replica_sender.cpp): a C++ thread that gathers them into pinned host
memory (with the copy engine, ordered after that event and lagged by one step; memcpy for a host
cache), checksums and sends them, holding no interpreter lock, so it never competes with the step loop for
it. (Gathering a slot after later steps ran is safe: a request's KV slots are written once, and a
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

from .. import _C


class Replicator:
    LINGER_S = 0.05      # every > 1: how long a batch waits for the next step before it leaves anyway
    ACK_LINGER_S = 0.01  # acknowledgements are forwarded in batches gathered over this long
    LAG_S = 0.002        # the longest a step's slots wait for the next step before they are gathered

    def __init__(self, worker, src: str):
        self.w, self.src = worker, src
        cache = worker.cache
        self.paused = False  # PipelineEngine.set_replication (between requests only)
        self._every = 1
        dev = worker.device
        self._cuda = dev.type == "cuda"
        self.native = _C.ReplicaSender(cache.layout(), cache.tensor.data_ptr(),
                                       (dev.index if dev.index is not None else torch.cuda.current_device())
                                       if self._cuda else -1,
                                       src, worker.cfg["kv_token"], str(cache.dtype).replace("torch.", ""),
                                       float(worker.cfg["timeout"]))
        self.native.set_every(1, self.LINGER_S)
        # A step's slots are gathered once the next step was handed over (at most LAG_S later): the copy
        # then runs beside that step's compute, not at the step boundary where the sampled tokens
        # are read back. DEJAVU_REPLICA_LAG_S=0 gathers at once (bench decode --replicate compares).
        self.native.set_lag(float(os.environ.get("DEJAVU_REPLICA_LAG_S", self.LAG_S)))
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

    def after_step(self, step_id: int, written: list[tuple[list[int], int, int]]) -> None:
        """A step wrote positions [start, end) of each (block table, start, end): send those slots."""
        if not self.paused:
            self.native.push_slots(step_id, written, self._stream())

    def send_blocks(self, tag: int, blocks: list[int]) -> None:
        """Re-seed the holder with whole blocks (its mirror was lost with the previous holder)."""
        self.native.push_blocks(tag, blocks, self._stream())

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued was sent (or failed) and its acknowledgements forwarded."""
        deadline = time.monotonic() + (timeout if timeout is not None else float(self.w.cfg["timeout"]) * 4)
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
        return torch.cuda.current_stream(self.w.device).cuda_stream if self._cuda else 0

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
        msg = {"t": kind, "rank": self.w.rank, "id": tag, "bytes": nbytes}
        if error:
            msg["error"] = error
        try:
            self.w.ch.send(msg)
        except OSError:
            pass  # the controller is gone; the main loop exits on its own
