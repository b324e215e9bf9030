"""Runs an engine (single-process or pipeline) on its own thread and serves asyncio callers.

Requests, aborts and results cross threads through queues: the engine thread owns the engine
(nothing else touches it); each request gets an asyncio.Queue that receives its progress as
("tokens", new token ids, finished?) updates, or one ("error", message, HTTP status), delivered on
the event loop.

A request that fails (its add raised, or the engine ended it with finish_reason "error") gets its
error and the loop goes on; only an exception the engine does not contain (a pipeline that cannot
recover, three failed steps in a row) stops the loop, after which every request is refused.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine.llm_engine import RequestError
from ..engine.sequence import Sequence
from ..sampling_params import SamplingParams
from .metrics import Metrics

log = logging.getLogger("dejavu.server")


class QueueFull(RuntimeError):
    pass


@dataclass(eq=False)  # compared and hashed by identity
class Stream:
    """One request's view from the event loop."""
    updates: asyncio.Queue
    seq: Sequence | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    sent: int = 0  # output tokens already delivered


class AsyncEngine:
    def __init__(self, engine, max_queue: int = 256, metrics: Metrics | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[Stream, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        m = self.metrics
        m.gauges["dejavu_queue_depth"] = lambda: self.queue_depth
        m.gauges["dejavu_running_requests"] = lambda: len(self._streams)
        if getattr(engine, "swap", 0):  # swapping: each microbatch has its own blocks, all of them in host memory
            m.gauges["dejavu_kv_blocks_used"] = lambda: sum(s.allocator.num_used for s in engine.slots)
            m.gauges["dejavu_kv_blocks_total"] = lambda: engine.host_blocks
            m.bytes_streamed["swap_in"] = lambda: sum(x["bytes_in"] for x in engine.swap_stats.values())
            m.bytes_streamed["swap_out"] = lambda: sum(x["bytes_out"] for x in engine.swap_stats.values())
            m.transfer_seconds["swap_in_exposed"] = lambda: sum(x["wait_s"] for x in engine.swap_stats.values())
            m.transfer_seconds["swap_step"] = lambda: sum(x["step_s"] for x in engine.swap_stats.values())
        else:
            alloc = getattr(engine, "allocator", None) or engine.cache.allocator
            m.gauges["dejavu_kv_blocks_used"] = lambda: alloc.num_used
            m.gauges["dejavu_kv_blocks_total"] = lambda: alloc.num_blocks
        if getattr(engine, "prefix_cache_stats", lambda: None)() is not None:  # docs/prefix-caching.md
            pc = engine.prefix_cache_stats
            m.counters["dejavu_prefix_cache_queried_tokens_total"] = lambda: pc()["queried_tokens"]
            m.counters["dejavu_prefix_cache_evictions_total"] = lambda: pc()["evictions"]
            m.counters["dejavu_prefix_cache_corrupt_blocks_total"] = lambda: pc()["disk_corrupt"]
            m.prefix_hit_tokens.update({t: (lambda t=t: pc()[f"{t}_hit_tokens"]) for t in ("device", "host", "disk")})
            m.bytes_streamed["prefix_offload"] = lambda: pc()["offloaded_bytes"]
            m.bytes_streamed["prefix_restore"] = lambda: pc()["restored_bytes"]
            if hasattr(engine, "prefix_cache_tiers"):
                m.prefix_tiers = engine.prefix_cache_tiers
        scheds = [x for x in getattr(engine, "slots", None) or [getattr(engine, "scheduler", None)]
                  if hasattr(x, "num_preemptions")]
        m.preemptions = lambda: sum(x.num_preemptions for x in scheds)
        if hasattr(engine, "kv_bytes"):  # disaggregated: KV streamed prompt -> token, and how long it showed
            m.bytes_streamed["prompt_to_token"] = lambda: engine.kv_bytes
            m.transfer_seconds["prompt_to_token_compute"] = lambda: sum(x["compute_s"] for x in engine.transfer_stats)
            m.transfer_seconds["prompt_to_token_exposed"] = lambda: sum(x["exposed_s"] for x in engine.transfer_stats)
            m.transfer_seconds["prompt_to_token_raw"] = lambda: sum(x["raw_s"] for x in engine.transfer_stats)
        if hasattr(engine, "decode_step_totals"):  # pipelines: the sampling stage's decode steps
            m.counters["dejavu_decode_steps_total"] = lambda: engine.decode_step_totals[0]
            m.counters["dejavu_decode_step_seconds_total"] = lambda: engine.decode_step_totals[1]
        if hasattr(engine, "fault_tolerance"):  # pipelines: failures, recoveries, replication
            ft = engine.fault_tolerance
            m.counters["dejavu_worker_failures_total"] = lambda: ft()["failures"]
            m.counters["dejavu_recoveries_total"] = lambda: ft()["failures"]
            m.counters["dejavu_recomputed_tokens_total"] = lambda: ft()["recomputed_tokens"]
            m.counters["dejavu_recovery_seconds_total"] = lambda: sum(e["total_s"] for e in ft()["recoveries"])
            m.bytes_streamed["replication"] = lambda: ft()["replicated_bytes"]
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        waiting = getattr(self.engine, "waiting", None)
        if waiting is None:
            waiting = self.engine.scheduler.waiting
        return len(waiting) + self._cmds.qsize()

    # ------------------------------------------------------------------ event-loop side
    async def submit(self, prompt, params: SamplingParams) -> Stream:
        """Validates and queues a request; raises RequestError / ValueError / QueueFull."""
        if self.error:
            raise RuntimeError(f"engine stopped: {self.error}")
        if self.queue_depth >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
        loop = asyncio.get_running_loop()
        stream = Stream(asyncio.Queue())
        done = loop.create_future()
        self._cmds.put(("add", prompt, params, stream, loop, done))
        await done  # the engine thread validated and enqueued it (or raised)
        self.metrics.inc("dejavu_requests_total")
        return stream

    def abort(self, stream: Stream) -> None:
        self._cmds.put(("abort", stream))

    def shutdown(self) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(30)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                idle = not self.engine.has_unfinished()
                self._drain(block=idle)
                if idle and hasattr(self.engine, "idle_check"):
                    self.engine.idle_check()  # a worker may die between requests too
                if self.engine.has_unfinished():
                    seqs = self.engine.step()
                    self._publish(seqs)
        except Exception as e:  # noqa: BLE001 - every waiting client hears about it
            log.exception("engine loop failed")
            self.error = f"{type(e).__name__}: {e}"
            for stream, loop in list(self._streams.values()):
                _deliver(loop, stream.updates.put_nowait, ("error", self.error, 500))
            self._streams.clear()
            # Keep answering: every request still queued or arriving later is refused, none hangs.
            while not self._stop.is_set():
                try:
                    cmd = self._cmds.get(timeout=0.1)
                except queue.Empty:
                    continue
                if cmd[0] == "add":
                    _, _, _, _, loop, done = cmd
                    _deliver(loop, _resolve, done, RuntimeError(f"engine stopped: {self.error}"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.1) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _run(self, cmd) -> None:
        if cmd[0] == "add":
            _, prompt, params, stream, loop, done = cmd
            try:
                seq = self.engine.add_request(prompt, params)
            except (RequestError, ValueError) as e:
                _deliver(loop, _resolve, done, e)
                return
            except Exception as e:  # noqa: BLE001 - this request fails, the engine goes on
                log.exception("adding a request failed")
                _deliver(loop, _resolve, done, RequestFailed(f"{type(e).__name__}: {e}"))
                return
            stream.seq = seq
            self._streams[seq.seq_id] = (stream, loop)
            self.metrics.inc("dejavu_prompt_tokens_total", seq.num_prompt_tokens)
            if not _deliver(loop, _resolve, done, None):
                self.engine.abort(seq)  # its event loop is gone
                self._streams.pop(seq.seq_id, None)
        elif cmd[0] == "abort":
            stream = cmd[1]
            if stream.seq is not None and not stream.seq.finished:
                self.engine.abort(stream.seq)
                self.metrics.inc("dejavu_requests_cancelled_total")
            if stream.seq is not None:
                self._streams.pop(stream.seq.seq_id, None)

    def _publish(self, seqs: list[Sequence]) -> None:
        now = time.monotonic()
        for s in seqs:
            entry = self._streams.get(s.seq_id)
            if entry is None:
                continue
            stream, loop = entry
            new = s.output_ids[stream.sent:]
            if new:
                self.metrics.inc("dejavu_generation_tokens_total", len(new))
                if stream.first_token is None:
                    stream.first_token = now
                    self.metrics.observe("ttft", now - stream.arrival)
                elif stream.last_token is not None:
                    self.metrics.observe("itl", now - stream.last_token)
                stream.last_token = now
                stream.sent = len(s.output_ids)
            if s.finished:
                self._streams.pop(s.seq_id, None)
                self.metrics.observe("e2e", now - stream.arrival)
                self.metrics.finish(s.finish_reason)
            if s.finish_reason == "error":
                update = ("error", s.error, 500)
            else:
                update = ("tokens", list(new), s.finished)
            if not _deliver(loop, stream.updates.put_nowait, update) and not s.finished:
                self.engine.abort(s)  # its event loop is gone
                self._streams.pop(s.seq_id, None)


class RequestFailed(RuntimeError):
    """A request that failed inside the engine for a reason other than its parameters."""


def _deliver(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Run fn(*args) on `loop`; False when that loop is closed (nobody is waiting any more)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _resolve(fut: asyncio.Future, exc) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
