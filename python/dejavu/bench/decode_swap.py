"""`dejavu bench decode --swap-stream`: the decode step with microbatch swapping running beside it
(and, with --replicate as well, with both streams at once)."""
from __future__ import annotations

import threading
import time

import torch

from .decode_replicate import REPLICATE_PATHS, _ReplicationStream
from .decode_runs import _advanced_steps, time_batch, _paired, _replays_off_on


SWAP_DRIVERS = ("step", "thread")


class _SwapStream:
    """Microbatch swapping beside the decode steps, as a `--swap` pipeline worker runs it while a
    microbatch computes: the worker's SwapCache (engine/swap.py) over a cache of its own, cycling
    three shadow microbatches of the decoded batch's size through two resident regions. Before each
    step, when the last swap-in has landed, the next shadow microbatch is prefetched: its blocks
    cross PCIe from pinned host memory in copy-engine copies on the swap stream (a thread's index
    copies on the CPU), so PCIe's host-to-device direction is busy all the time: a worst case.
    Nothing of it touches the decoded batch. driver "step": the decode loop starts each swap-in
    between two steps (its host time counts in the step); "thread": a thread of its own does, as a
    worker's receiving thread starts the prefetch of a step message that arrives, waiting for each
    swap-in with the GIL released (the step pays only for sharing the GIL)."""

    def __init__(self, llm, blocks: int, driver: str = "step"):
        from ..engine.swap import SwapCache

        t = llm.engine.runner.cache.tensor  # [layers, blocks, 2, block_size, kv_heads, head_dim]
        dev = torch.zeros((t.shape[0], 2 * blocks) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
        self.swap = SwapCache(dev, 3 * blocks, resident=2)
        self.mbs = [list(range(i * blocks, (i + 1) * blocks)) for i in range(3)]
        self.current: int | None = None  # the shadow microbatch whose swap-in was started last
        self.prefetches = 0
        self.host_s, self.calls = 0.0, 0  # time in before_step: the host's own share of the swap's cost
        if driver not in SWAP_DRIVERS:
            raise ValueError(f"swap driver must be one of {', '.join(SWAP_DRIVERS)}, got {driver!r}")
        self.driver = driver
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._before_step()
            ready = [r.ready for r in self.swap.regions if r.ready is not None and not r.ready.done()]
            if ready:
                ready[0].result()  # an event wait: the GIL is released meanwhile
            else:
                time.sleep(0.0005)

    def before_step(self) -> None:
        if self.driver == "thread":
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="swap-driver", daemon=True)
                self._thread.start()
            return
        t0 = time.perf_counter()
        try:
            self._before_step()
        finally:
            self.host_s += time.perf_counter() - t0
            self.calls += 1

    def _before_step(self) -> None:
        if self.swap.busy():
            return  # the last swap-in is still crossing: PCIe stays busy without a queue building up
        if self.current is not None:  # its "step": it computes nothing and writes nothing back
            mapping = self.swap.acquire(self.current, self.mbs[self.current])  # landed: no wait
            self.swap.write_back(mapping, [])
        self.current = 0 if self.current is None else (self.current + 1) % 3
        self.swap.prefetch(self.current, self.mbs[self.current])  # evicts the older resident one
        self.prefetches += 1

    def drain(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        while self.swap.busy():
            time.sleep(0.001)

    def close(self) -> None:
        self.drain()
        self.swap.close()


def _with_swap(llm, batch: list[list[int]], max_tokens: int, pairs: int, blocks: int, driver: str = "step") -> dict:
    """The batch decoded `pairs` times without and with a swap stream running beside it (_SwapStream),
    alternating, the same engine throughout."""
    off, on, same = [], [], []
    timed: dict[bool, dict] = {False: {}, True: {}}  # the evented pair's timings (time_batch), off / on
    stream = _SwapStream(llm, blocks, driver)
    try:
        # `pairs` timed pairs, then one more with events around each step (apart: on an H200 the
        # events' own records cost the run with swap-ins 0.3% more at batch 8)
        for i in range(pairs + 1):
            evented = i == pairs
            _, t_off, ids_off = time_batch(llm, batch, max_tokens, timing=timed[False] if evented else None)
            _, t_on, ids_on = time_batch(llm, batch, max_tokens, swap=stream, timing=timed[True] if evented else None)
            stream.drain()
            same.append(ids_on == ids_off)
            if not evented:
                off.append(t_off)
                on.append(t_on)
        host_ms = 1e3 * stream.host_s / max(stream.calls, 1)  # (0 with the thread driver)
        stream.driver = "step"  # the GPU-time comparison below starts swap-ins between its replays
        gpu = _swap_gpu_ms(llm, len(batch), stream, pairs)
    finally:
        stream.close()
    off_ms, on_ms, ratio, pair_ratios = _paired(off, on)
    off_t, on_t = timed[False], timed[True]
    if "busy" in off_t and "busy" in on_t:
        gpu.update({"swap_loop_busy_off_ms": off_t["busy"], "swap_loop_busy_on_ms": on_t["busy"],
                    "swap_loop_gap_off_ms": off_t["gap"], "swap_loop_gap_on_ms": on_t["gap"],
                    "swap_loop_busy_ratio": on_t["busy"] / off_t["busy"]})
    # a swap-in still crossing when the decode was done: waited for after the run, not counted in it
    gpu["swap_tail_ms"] = on_t["tail"]
    return {**gpu, "swap_host_ms_per_step": host_ms, "swap_off_ms_per_step": off_ms, "swap_ms_per_step": on_ms, "swap_ratio": ratio,
            "swap_pair_ratios": pair_ratios, "swap_bytes_in": stream.swap.bytes_in, "swap_prefetches": stream.prefetches,
            "swap_block_bytes": stream.swap.block_bytes, "swap_same_tokens": all(same)}


def _swap_gpu_ms(llm, batch: int, stream: _SwapStream, pairs: int, n: int = 40) -> dict:
    """GPU time of the batch's decode graph replayed n times, each timed by events and waited for,
    without and with the swap stream's swap-ins crossing PCIe meanwhile (alternating, `pairs`
    times): the device's share of the swap's cost, apart from the host's (no input upload, no
    sampling). Nothing on a CPU or without graphs."""
    graphs = llm.engine.runner.graphs
    if graphs is None:
        return {}

    def before(busy: bool) -> None:  # the host starts the next swap-in between replays, as between steps
        if busy:
            stream.before_step()

    off, on = _replays_off_on(graphs.graph(batch), pairs, n, lambda _: stream.drain(), before)
    return {"swap_gpu_off_ms": off, "swap_gpu_on_ms": on, "swap_gpu_ratio": on / off}


def _with_both(llm, batch: list[list[int]], max_tokens: int, pairs: int, blocks: int,
               path: str = REPLICATE_PATHS[0], every: int = 1, holder: str = "thread", driver: str = "step") -> dict:
    """The batch decoded `pairs` times without any stream and with both at once: every step's new KV
    replicated through `path` (_ReplicationStream) while a swap stream (_SwapStream) moves shadow
    microbatches in beside it, alternating, the same engine throughout: issue 9's "with token-level
    replication and swapping streams running"."""
    off, on, same, exact = [], [], [], []
    advanced = 0  # replicated steps that ran from the inputs the step before left on the device
    rep = _ReplicationStream(llm, every, holder)
    swap = _SwapStream(llm, blocks, driver)
    try:
        rep.using(path)  # a path this engine cannot run fails before any run
        for _ in range(pairs):
            _, t_off, ids_off = time_batch(llm, batch, max_tokens)
            with rep.using(path):
                a0 = _advanced_steps(llm)
                _, t_on, ids_on = time_batch(llm, batch, max_tokens, swap=swap)
                advanced += _advanced_steps(llm) - a0
            swap.drain()
            exact.append(rep.mirror_matches())  # before the next run reuses the blocks
            same.append(ids_on == ids_off)
            off.append(t_off)
            on.append(t_on)
    finally:
        swap.close()
        rep.close()
    off_ms, on_ms, ratio, pair_ratios = _paired(off, on)
    return {"both_off_ms_per_step": off_ms, "both_ms_per_step": on_ms, "both_ratio": ratio,
            "both_pair_ratios": pair_ratios, "both_path": path, "both_same_tokens": all(same),
            "both_replica_exact": all(exact), "both_acked": f"{rep.acks}/{rep.step_id}",
            "both_swap_prefetches": swap.prefetches, "both_swap_bytes_in": swap.swap.bytes_in,
            "both_advanced_steps": advanced}
