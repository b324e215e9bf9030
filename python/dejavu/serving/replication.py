"""Worker side of `--replicate`: stream the KV this worker writes to its replica holder.

After every step (and every disaggregated admission) the token slots the step wrote leave for the
holder's ReplicaServer, which applies them to its mirror of this worker's cache. The step itself
only records a CUDA event and queues the slots; a background thread gathers them with DéjàVuLib
into pinned host memory (on CUDA: on a copy stream, ordered after that event; on CPU: by C++
threads) and sends them. (Gathering a slot after later steps ran is safe: a request's KV slots are
written once, and a block freed and reused meanwhile is re-sent by its new owner later in the same
FIFO queue.) Once the holder acknowledged, the worker tells the
controller "replicated <step>"; the controller advances each request's watermark when every stage
of the step has acknowledged. Nothing here blocks the step itself; the queue is FIFO, so
acknowledgements arrive in step order and a watermark is always a prefix.
"""
from __future__ import annotations

import contextlib
import queue
import sys
import threading

import torch

from ..kvstream import Region, StreamError
from ..kvstream.replica import ReplicaClient, ReplicaError


class Replicator:
    LINGER_S = 0.05  # every > 1: how long a batch waits for the next step before it leaves anyway
    def __init__(self, worker, src: str):
        self.w, self.src = worker, src
        self.client: ReplicaClient | None = None
        self.q: queue.Queue = queue.Queue()
        self.bytes = 0
        cache = worker.cache
        self.shape = tuple(cache.tensor.shape)
        self._sync = None  # CUDA: a stream on which the sending thread's blocking events are recorded
        self.paused = False  # PipelineEngine.set_replication (between requests only)
        self.every = 1       # steps per gather and send (set_replication(every=))
        threading.Thread(target=self._loop, daemon=True, name="replicator").start()

    # ------------------------------------------------------------------ called by the main thread
    def set_holder(self, addr) -> None:
        self.q.put(("holder", tuple(addr)))

    def after_step(self, step_id: int, written: list[tuple[list[int], int, int]]) -> None:
        """A step wrote positions [start, end) of each (block table, start, end): send those slots."""
        if not self.paused:
            self.q.put(("slots", step_id, written, self._after()))

    def send_blocks(self, tag: int, blocks: list[int]) -> None:
        """Re-seed the holder with whole blocks (its mirror was lost with the previous holder)."""
        self.q.put(("blocks", tag, blocks, self._after()))

    def drain(self) -> None:
        self.q.join()

    def _after(self):
        """What the gather must wait for: the work queued so far on the caller's stream."""
        if self.w.device.type != "cuda":
            return None
        return torch.cuda.current_stream(self.w.device).record_event()

    def _region(self, kind: str, what) -> Region | None:
        layers = range(self.w.cache.num_layers)
        if kind == "blocks":
            return Region.chunks(layers, what)
        bs = self.w.cache.block_size
        blocks = [table[p // bs] for table, a, b in what for p in range(a, b)]
        slots = [p % bs for _, a, b in what for p in range(a, b)]
        return Region.tokens(layers, blocks, slots) if blocks else None

    def _gather(self, region: Region, after):
        """Pack the region into pinned host memory; returns (pool buffer or None, tensor, bytes)."""
        streamer = self.w.streamer
        n = region.nbytes(streamer.layout)
        try:
            buf = streamer.pool.alloc(n)
            tensor = buf.tensor
        except MemoryError:  # pool exhausted: a buffer of its own
            buf, tensor = None, torch.empty(n, dtype=torch.uint8, pin_memory=self.w.device.type == "cuda")
        try:
            fut = streamer.gather(region, tensor, after=after)
            if fut.event is not None:
                # Sleep on a blocking-sync event (no polling: a polling thread keeps taking the GIL
                # and the driver from the thread launching the next step).
                if self._sync is None:
                    self._sync = torch.cuda.Stream(self.w.device)
                self._sync.wait_event(fut.event)
                done = torch.cuda.Event(blocking=True)
                done.record(self._sync)
                done.synchronize()
            fut.wait(self.w.cfg["timeout"])
        except BaseException:
            if buf is not None:
                buf.free()
            raise
        return buf, tensor, n

    # ------------------------------------------------------------------ the sending thread
    def _loop(self) -> None:
        ahead = None  # an item taken while batching that was not a step's slots
        while True:
            item, ahead = ahead or self.q.get(), None
            batch = [item]
            try:
                if item[0] == "holder":
                    self._connect(item[1])
                    continue
                if item[0] == "slots":
                    # every > 1: one gather and one send for up to `every` steps (fewer wake-ups and
                    # messages; the watermark trails by up to every - 1 steps more).
                    while len(batch) < self.every:
                        try:
                            nxt = self.q.get(timeout=self.LINGER_S)
                        except queue.Empty:
                            break
                        if nxt[0] != "slots":
                            ahead = nxt
                            break
                        batch.append(nxt)
                kind, tag = item[0], item[1]
                what = [w for it in batch for w in it[2]] if kind == "slots" else item[2]
                region = self._region(kind, what)
                if self.client is None:
                    if kind == "blocks":
                        self._ack("rereplicated", tag, "no replica holder")
                    continue
                if region is not None:
                    with torch.cuda.device(self.w.device) if self.w.device.type == "cuda" else contextlib.nullcontext():
                        buf, tensor, n = self._gather(region, batch[-1][3])  # the last event implies the others
                    try:
                        self._send(kind, region, tensor[:n], n)
                    finally:
                        if buf is not None:
                            buf.free()
                for it in batch:
                    self._ack("replicated" if kind == "slots" else "rereplicated", it[1])
            except Exception as e:  # noqa: BLE001 - the thread must outlive any one item, or drain() never returns
                # The holder is gone (or refused), or a bug: stop acknowledging; the controller
                # replaces the holder, and the watermarks stay where the last acknowledgement left them.
                what = str(e) if isinstance(e, (OSError, ReplicaError, StreamError)) else f"{type(e).__name__}: {e}"
                print(f"[dejavu worker {self.src}] replication to its holder failed: {what}", file=sys.stderr, flush=True)
                if self.client is not None:
                    self.client.close()
                self.client = None
                if item[0] == "blocks":
                    self._ack("rereplicated", item[1], str(e))
            finally:
                for _ in batch:
                    self.q.task_done()

    def _connect(self, addr) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        client = ReplicaClient(addr[0], int(addr[1]), self.w.cfg["kv_token"], timeout=self.w.cfg["timeout"])
        client.open(self.src, self.shape, self.w.cache.dtype)
        self.client = client

    def _send(self, kind, region, payload, n) -> None:
        if kind == "slots":
            self.client.put_slots(self.src, region.blocks, region.slots, payload)
        else:
            self.client.put_blocks(self.src, region.blocks, payload)
        self.bytes += n

    def _ack(self, kind: str, tag: int, error: str | None = None) -> None:
        msg = {"t": kind, "rank": self.w.rank, "id": tag, "bytes": self.bytes}
        if error:
            msg["error"] = error
        try:
            self.w.ch.send(msg)
        except OSError:
            pass  # the controller is gone; the main loop exits on its own
