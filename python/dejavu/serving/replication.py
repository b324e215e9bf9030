"""Worker side of `--replicate`: stream the KV this worker writes to its replica holder.

After every step (and every disaggregated admission) the token slots the step wrote are gathered
by DéjàVuLib into pinned host memory (on CUDA: on a copy stream, after the step's compute; on CPU:
by C++ threads), and a background thread sends them to the holder's ReplicaServer, which applies
them to its mirror of this worker's cache. Once the holder acknowledged, the worker tells the
controller "replicated <step>"; the controller advances each request's watermark when every stage
of the step has acknowledged. Nothing here blocks the step itself; the queue is FIFO, so
acknowledgements arrive in step order and a watermark is always a prefix.
"""
from __future__ import annotations

import queue
import sys
import threading

import torch

from ..kvstream import Region, StreamError
from ..kvstream.replica import ReplicaClient, ReplicaError


class Replicator:
    def __init__(self, worker, src: str):
        self.w, self.src = worker, src
        self.client: ReplicaClient | None = None
        self.q: queue.Queue = queue.Queue()
        self.bytes = 0
        cache = worker.cache
        self.shape = tuple(cache.tensor.shape)
        self._sync = None  # CUDA: a stream on which the sending thread's blocking events are recorded
        self.paused = False  # PipelineEngine.set_replication (between requests only)
        threading.Thread(target=self._loop, daemon=True, name="replicator").start()

    # ------------------------------------------------------------------ called by the main thread
    def set_holder(self, addr) -> None:
        self.q.put(("holder", tuple(addr)))

    def after_step(self, step_id: int, written: list[tuple[list[int], int, int]]) -> None:
        """A step wrote positions [start, end) of each (block table, start, end): send those slots."""
        if self.paused:
            return
        bs = self.w.cache.block_size
        blocks = [table[p // bs] for table, a, b in written for p in range(a, b)]
        slots = [p % bs for _, a, b in written for p in range(a, b)]
        if blocks:
            self._enqueue("slots", step_id, Region.tokens(range(self.w.cache.num_layers), blocks, slots))

    def send_blocks(self, tag: int, blocks: list[int]) -> None:
        """Re-seed the holder with whole blocks (its mirror was lost with the previous holder)."""
        self._enqueue("blocks", tag, Region.chunks(range(self.w.cache.num_layers), blocks))

    def drain(self) -> None:
        self.q.join()

    def _enqueue(self, kind: str, tag: int, region: Region) -> None:
        streamer = self.w.streamer
        n = region.nbytes(streamer.layout)
        try:
            buf = streamer.pool.alloc(n)
            tensor = buf.tensor
        except MemoryError:  # pool exhausted by earlier replications still in flight: a buffer of its own
            buf, tensor = None, torch.empty(n, dtype=torch.uint8, pin_memory=self.w.device.type == "cuda")
        fut = streamer.gather(region, tensor)
        done = None
        if fut.event is not None:
            # The sending thread sleeps on a blocking-sync event (no polling: a polling thread keeps
            # taking the GIL and the driver from the thread launching the next step).
            if self._sync is None:
                self._sync = torch.cuda.Stream(self.w.device)
            self._sync.wait_event(fut.event)
            done = torch.cuda.Event(blocking=True)
            done.record(self._sync)
        self.q.put((kind, tag, region, buf, tensor, fut, n, done))

    # ------------------------------------------------------------------ the sending thread
    def _loop(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item[0] == "holder":
                    self._connect(item[1])
                else:
                    self._send(*item)
            except (OSError, ReplicaError, StreamError) as e:
                # The holder is gone (or refused): stop acknowledging; the controller replaces it.
                print(f"[dejavu worker {self.src}] replication to its holder failed: {e}", file=sys.stderr, flush=True)
                if self.client is not None:
                    self.client.close()
                self.client = None
                if item[0] == "blocks":
                    self._ack("rereplicated", item[1], str(e))
            finally:
                if item[0] != "holder":
                    buf = item[3]
                    if buf is not None:
                        buf.free()
                self.q.task_done()

    def _connect(self, addr) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        client = ReplicaClient(addr[0], int(addr[1]), self.w.cfg["kv_token"], timeout=self.w.cfg["timeout"])
        client.open(self.src, self.shape, self.w.cache.dtype)
        self.client = client

    def _send(self, kind, tag, region, buf, tensor, fut, n, done) -> None:
        if done is not None:
            done.synchronize()
        fut.wait(self.w.cfg["timeout"])
        if self.client is None:
            if kind == "blocks":
                self._ack("rereplicated", tag, "no replica holder")
            return
        payload = tensor[:n]
        if kind == "slots":
            self.client.put_slots(self.src, region.blocks, region.slots, payload)
            self.bytes += n
            self._ack("replicated", tag)
        else:
            self.client.put_blocks(self.src, region.blocks, payload)
            self.bytes += n
            self._ack("rereplicated", tag)

    def _ack(self, kind: str, tag: int, error: str | None = None) -> None:
        msg = {"t": kind, "rank": self.w.rank, "id": tag, "bytes": self.bytes}
        if error:
            msg["error"] = error
        try:
            self.w.ch.send(msg)
        except OSError:
            pass  # the controller is gone; the main loop exits on its own
