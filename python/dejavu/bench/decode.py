"""`dejavu bench decode`: the engine's decode step against the weight-read floor and HF's `generate`.

For each batch size, one run of the same random prompts through: our engine with its GPU fast path
(decode kernels + CUDA graphs), our engine eager (the same kernels, no graphs), and HF transformers
(`generate`, plus forward passes over the prompts for its prefill time). Reported per batch:
prefill time (the median of 3 runs alternating with HF's forward pass, after an untimed one of
each), ms per decode step (engine step, host work included, greedy steps overlapped with the
host's work; "sync", the same with each step waiting for its tokens before the next is queued;
and "GPU ms", the step's graph replayed alone, i.e. without the scheduler, sampling and copies on
the host), decode tokens/s, the ratio to the floor and to HF, and whether the greedy tokens agree
with HF's (and where each sequence parts from HF's).

The floor is the time to read the weights once: weight bytes / the device's bandwidth, measured in
the same run as a device-to-device copy of 1 GiB counted as 2 GiB of traffic (read + write).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

from ..engine.block_manager import blocks_for
from . import write_json
from .generate import _sync, random_hf_model


def device_bandwidth(dev: torch.device, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Bytes per second of memory traffic of a device-to-device copy (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The index of the first new token where two greedy sequences differ (None: equal)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _ours(llm, prompts: list[list[int]], max_tokens: int, swap=None,
          timing: dict | None = None) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, seconds per decode step, output ids) of one batch through the engine.
    `swap` (a _SwapStream): a swap stream runs beside the decode steps. (A _ReplicationStream
    entered around the call streams every decode step's new KV to a replica holder.) `timing` (a
    dict) gets "tail": the ms the device went on after the decode's stream was done (other streams'
    work); with CUDA graphs, each replay is timed by events, and it gets "busy" and "gap": the mean
    ms per step the device ran the steps and sat idle between them."""
    from ..sampling_params import SamplingParams

    eng = llm.engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [eng.add_request(p, params) for p in prompts]
    dev = llm.device
    _sync(dev)
    t0 = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        eng.step()
    _sync(dev)
    t1 = time.perf_counter()
    first = max(s.num_output_tokens for s in seqs)
    graphs = eng.runner.graphs if timing is not None else None
    if graphs is not None:
        graphs.step_events = []
    while eng.has_unfinished():
        if swap is not None:
            swap.before_step()
        eng.step()
    # The decode ends when its own stream is done (every token is on the host by now). A swap-in or
    # a replication copy still crossing on a stream of its own is not the decode's time: a device
    # synchronisation here waited for the swap-in in flight (up to a whole one, ~20 ms at batch 8).
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    t2 = time.perf_counter()
    _sync(dev)
    if timing is not None:
        timing["tail"] = 1e3 * (time.perf_counter() - t2)
    if graphs is not None:
        events, graphs.step_events = graphs.step_events, None
        if events:
            busy = sum(a.elapsed_time(b) for a, b in events)
            span = events[0][0].elapsed_time(events[-1][1])
            timing["busy"], timing["gap"] = busy / len(events), (span - busy) / len(events)
    # decode steps: tokens after the first (an overlapped step's call returns before its tokens land)
    steps = max(s.num_output_tokens for s in seqs) - first
    return t1 - t0, (t2 - t1) / max(steps, 1), [s.output_ids for s in seqs]


class _ReplicationStream:
    """Token-level replication as a `--replicate` token worker runs it (serving/replication.py's
    Replicator), into a ReplicaServer. Path "ring": the decode graphs also write each new token's K/V
    into the Replicator's pinned ring, and DéjàVuLib's C++ sending thread sends those rows; "gather":
    the step records an event and queues its slots, and the sending thread gathers them into pinned
    memory with the copy engine first. By default the server runs in this process
    and applies the slots to its host mirror as the ring neighbour's holder would, so this process
    pays for both directions of a ring, like a worker does; holder="process" runs it in a process of
    its own (the sending side's cost alone). Workers' GIL switch interval (0.5 ms) applies while it
    runs."""

    def __init__(self, llm, every: int = 1, holder: str = "thread", skip: str = "none"):
        from ..kvstream.replica import ReplicaServer
        from ..kvstream.transports import new_cluster_token
        from ..serving.replication import Replicator

        if holder not in ("thread", "process"):
            raise ValueError(f"replica holder must be thread or process, got {holder!r}")
        if skip not in ("none", "gather", "send"):
            raise ValueError(f"--replicate-skip must be none, gather or send, got {skip!r}")
        self.cache = llm.engine.runner.cache
        self.device = self.cache.device
        token = new_cluster_token()
        self.cfg = SimpleNamespace(timeout=60.0, kv_token=token)
        self.rank, self.ch, self.acks, self.step_id, self.recent = 0, self, 0, 0, []
        self.server = self.proc = None
        if holder == "thread":  # this process applies the slots too, as a worker holding its neighbour's
            self.server = ReplicaServer(token)
            port = self.server.port
        else:  # the holder in a process of its own: the sender's cost alone
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from dejavu.kvstream.replica import ReplicaServer; "
                 "s = ReplicaServer(sys.argv[1]); print(s.port, flush=True); sys.stdin.read()", token],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            port = int(self.proc.stdout.readline())
        self.replicator = Replicator(self, "bench")
        # diagnostics: 'gather' sends zeros without touching the GPU, 'send' gathers but sends nothing
        self.replicator.native.set_skip(skip == "gather", skip == "send")
        self.replicator.every = every  # steps per gather and send (PipelineEngine.set_replication(every=))
        self.port = port
        self.replicator.set_holder(("127.0.0.1", port))
        self._switch = sys.getswitchinterval()
        self.runner = llm.engine.runner
        self.path = "gather"

    def using(self, path: str) -> "_ReplicationStream":
        if path == "ring" and self.replicator.ring is None:
            raise ValueError("--replicate-path ring: this engine has no replication ring (DEJAVU_REPLICA_RING=0, "
                             "or no decode kernels for this cache)")
        self.path = path
        return self

    def __enter__(self):
        # The runner hands each decode step to after_step as it is queued (steps stay overlapped);
        # with the ring the first time captures the decode graphs again.
        self.runner.set_kv_tap(self.replicator if self.path == "ring" else None, self.after_step)
        sys.setswitchinterval(float(os.environ.get("DEJAVU_SWITCH_INTERVAL", "0.0005")))
        return self

    def __exit__(self, *exc):
        self.runner.set_kv_tap(None)
        self.replicator.drain()
        sys.setswitchinterval(self._switch)

    def send(self, msg) -> None:  # the Replicator's acknowledgements (a worker's controller channel)
        if msg.t == "replicated" and msg.error is None:
            self.acks += 1

    def after_step(self, written) -> None:
        self.step_id += 1
        self.recent = (self.recent + [[(list(t), a, b) for t, a, b in written]])[-4:]
        self.replicator.after_step(self.step_id, written)

    def close(self) -> None:
        self.replicator.close()
        if self.server is not None:
            self.server.stop()
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(30)

    def mirror_matches(self) -> bool:
        """The holder's copy of the last steps' slots equals the device cache's (call after the run,
        before the blocks are reused: the stream carried the right KV)."""
        from ..kvstream.replica import ReplicaClient

        bs = self.cache.block_size
        slots = sorted({(table[p // bs], p % bs) for ws in self.recent for table, a, b in ws for p in range(a, b)})
        blocks = sorted({b for b, _ in slots})
        if self.server is not None:
            data = self.server.mirrors["bench"].data[:, blocks]
        else:
            client = ReplicaClient("127.0.0.1", self.port, self.cfg.kv_token)
            try:
                raw, _ = client.get_blocks("bench", blocks)
            finally:
                client.close()
            data = raw.view(self.cache.dtype).view((self.cache.num_layers, len(blocks)) + tuple(self.cache.tensor.shape[2:]))
        idx = {b: i for i, b in enumerate(blocks)}
        return all(torch.equal(data[:, idx[b], :, s].to(self.device), self.cache.tensor[:, b, :, s]) for b, s in slots)


def _paired(off: list[float], on: list[float]) -> tuple[float, float, float, list[float]]:
    """Seconds per step of alternating off / on runs of one batch: (ms per step off, ms per step on,
    on / off over all runs, each pair's on / off)."""
    n = len(off)
    return 1e3 * sum(off) / n, 1e3 * sum(on) / n, sum(on) / sum(off), [b / a for a, b in zip(off, on)]


def _paired_line(what: str, on_ms: float, off_ms: float, ratio: float, pair_ratios: list[float], pairs: int) -> str:
    return (f"      {what}: {on_ms:.3f} ms/step against {off_ms:.3f} off, alternating in {pairs} pairs -> {ratio:.3f} "
            f"(pairs: {', '.join(f'{x:.3f}' for x in pair_ratios)})")


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
    timed: dict[bool, dict] = {False: {}, True: {}}  # the evented pair's timings (_ours), off / on
    stream = _SwapStream(llm, blocks, driver)
    try:
        # `pairs` timed pairs, then one more with events around each step (apart: on an H200 the
        # events' own records cost the run with swap-ins 0.3% more at batch 8)
        for i in range(pairs + 1):
            evented = i == pairs
            _, t_off, ids_off = _ours(llm, batch, max_tokens, timing=timed[False] if evented else None)
            _, t_on, ids_on = _ours(llm, batch, max_tokens, swap=stream, timing=timed[True] if evented else None)
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


def _replays_off_on(g: torch.cuda.CUDAGraph, pairs: int, n: int, setup, before=None) -> tuple[float, float]:
    """Mean GPU ms of graph g replayed n times, each timed by events and waited for (one at a time,
    as steps run), after setup(False) and after setup(True), alternating `pairs` times; before(on),
    if given, runs ahead of each replay. (off ms, on ms)."""
    times = {False: [], True: []}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(pairs):
        for on in (False, True):
            setup(on)
            total = 0.0
            for _ in range(n):
                if before is not None:
                    before(on)
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                total += start.elapsed_time(end)
            times[on].append(total / n)
    return sum(times[False]) / pairs, sum(times[True]) / pairs


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


# The ways bench decode replicates, in its default order: the gather first, the cheaper one for this
# engine, whose steps are queued ahead (the ring is pipeline workers'; docs/fault-tolerance.md).
REPLICATE_PATHS = ("gather", "ring")


def _advanced_steps(llm) -> int:
    """Decode steps so far that ran from the inputs the step before left on the device, by the
    engine's current graphs (0 without graphs; a ring's first use captures new ones)."""
    graphs = llm.engine.runner.graphs
    return graphs.num_advanced if graphs is not None else 0


def _ring_gpu_ms(llm, batch: int, start: int, pairs: int, n: int = 40) -> dict:
    """GPU time of the batch's decode graph (captured with a replication ring) replayed n times,
    each timed by events and waited for, with its ring rows set (the kernels also store each new
    token's K/V into the ring, across PCIe) and unset, alternating `pairs` times: the device's
    share of the ring's cost. Rows are at position `start` of free blocks; nothing reads what the
    replays write, and no step is committed, so nothing is sent. {} without a ring's graphs."""
    graphs = llm.engine.runner.graphs
    if graphs is None or graphs.ring is None or batch > graphs.ring.tensor.shape[1]:
        return {}
    per = blocks_for(start + 1, graphs.block_size)
    if batch * per > llm.engine.runner.cache.num_blocks:
        return {}
    items = [([1], start, list(range(i * per, (i + 1) * per))) for i in range(batch)]
    g = graphs.graph(batch)  # (its inputs come from pinned buffer 0)
    bucket = graphs.bucket(batch)

    def setup(ring: bool) -> None:
        graphs._fill(items, bucket, 0, 0 if ring else -1)
        g.replay()  # (untimed)

    off, on = _replays_off_on(g, pairs, n, setup)
    return {"ring_gpu_off_ms": off, "ring_gpu_on_ms": on, "ring_gpu_ratio": on / off}


def _with_replication(llm, batch: list[list[int]], max_tokens: int, pairs: int, every: int = 1,
                      holder: str = "thread", skip: str = "none", paths: tuple[str, ...] = REPLICATE_PATHS) -> dict:
    """The batch decoded `pairs` times without replication and with it through each of `paths`,
    alternating (off, path 1, path 2, off, ...), the same engine throughout. The replicate_* keys
    are the first path's; replicate_by_path has every path's."""
    bad = [p for p in paths if p not in REPLICATE_PATHS]
    if bad or not paths:
        raise ValueError(f"--replicate-path takes {', '.join(REPLICATE_PATHS)}, got {', '.join(paths) or 'nothing'}")
    off, on, exact = [], {p: [] for p in paths}, []
    stream = _ReplicationStream(llm, every, holder, skip)
    chained = 0  # steps of the replicated runs queued before the tokens of the step before were read
    advanced = {p: 0 for p in paths}  # replicated steps that ran from the inputs the step before left on the device
    try:
        for p in paths:
            stream.using(p)  # a path this engine cannot run fails before any run
        for _ in range(pairs):
            off.append(_ours(llm, batch, max_tokens)[1])
            for p in paths:
                with stream.using(p):
                    c0, a0 = llm.engine.num_chained, _advanced_steps(llm)
                    on[p].append(_ours(llm, batch, max_tokens)[1])
                    chained += llm.engine.num_chained - c0
                    advanced[p] += _advanced_steps(llm) - a0
                exact.append(stream.mirror_matches())  # each run's last steps, before the next run reuses the blocks
        # (after the runs, with no request running: the ring's graphs are the engine's now)
        gpu = _ring_gpu_ms(llm, len(batch), len(batch[0]) + max_tokens // 2, pairs) if "ring" in paths else {}
    finally:
        stream.close()
    by_path = {}
    for p in paths:
        off_ms, on_ms, ratio, pair_ratios = _paired(off, on[p])
        by_path[p] = {"ms_per_step": on_ms, "ratio": ratio, "pair_ratios": pair_ratios, "advanced_steps": advanced[p]}
    first = by_path[paths[0]]
    return {"replicate_off_ms_per_step": off_ms, "replicate_ms_per_step": first["ms_per_step"],
            "replicate_ratio": first["ratio"], "replicate_pair_ratios": first["pair_ratios"],
            "replicate_by_path": by_path, "replicate_acked": f"{stream.acks}/{stream.step_id}",
            "replica_exact": all(exact), "replicate_bytes": stream.replicator.bytes,
            "replicate_ring_misses": stream.replicator.ring_misses,
            "replicate_chained_steps": chained, **gpu}


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
            _, t_off, ids_off = _ours(llm, batch, max_tokens)
            with rep.using(path):
                a0 = _advanced_steps(llm)
                _, t_on, ids_on = _ours(llm, batch, max_tokens, swap=swap)
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


def _with_pdl(llm, batch: list[list[int]], max_tokens: int, pairs: int) -> dict:
    """The batch decoded `pairs` times with the decode kernels' programmatic dependent launch off
    and on, alternating (off, on, off, ...), the CUDA graphs captured again for each setting; then
    the setting goes back to the environment's."""
    from .. import _C

    runner = llm.engine.runner
    runs = {0: [], 1: []}
    gpu = {0: [], 1: []}
    try:
        for _ in range(pairs):
            for mode in (0, 1):
                _C.set_programmatic_launch(mode)
                if runner.graphs is not None:
                    runner.graphs = runner.graphs.recapture(runner.graphs.ring)
                runs[mode].append(_ours(llm, batch, max_tokens)[1])
                if runner.graphs is not None:
                    gpu[mode].append(replay_ms(runner.graphs, len(batch)))
    finally:
        _C.set_programmatic_launch(-1)
        if runner.graphs is not None:
            runner.graphs = runner.graphs.recapture(runner.graphs.ring)
    off_ms, on_ms, ratio, pair_ratios = _paired(runs[0], runs[1])
    out = {"pdl_off_ms_per_step": off_ms, "pdl_on_ms_per_step": on_ms, "pdl_ratio": ratio,
           "pdl_pair_ratios": pair_ratios}
    if gpu[0]:
        out.update(pdl_off_gpu_ms=sum(gpu[0]) / pairs, pdl_on_gpu_ms=sum(gpu[1]) / pairs)
    return out


def _replay_ms(g: torch.cuda.CUDAGraph, n: int) -> float:
    """Milliseconds per replay of a captured graph, n replays back to back after one untimed."""
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def replay_ms(graphs, batch: int, n: int = 20) -> float:
    """GPU time of one decode step: the batch's graph replayed back to back (the static inputs
    still hold the last step's, whose blocks are free by now; nothing reads what this writes)."""
    return _replay_ms(graphs.graph(batch), n)


def attention_ms(graphs, batch: int, n: int = 5) -> float:
    """GPU time of the decode attention kernels of one step (every layer), on the last step's block
    tables and context lengths: the calls are captured in a CUDA graph, so no host launch overhead
    is counted (at batch 1 the kernels are shorter than a Python call)."""
    from .. import kernels

    bucket = graphs.bucket(batch)
    *_, ctx, _rows, tables = graphs._views(graphs.dev, bucket)
    cache, cfg = graphs.cache, graphs.model.cfg
    q = torch.randn(bucket, cfg.num_heads, cfg.head_dim, device=cache.device, dtype=cache.dtype)
    scale = cfg.head_dim ** -0.5

    def step():
        for layer in cache.tensor:
            kernels.decode_attention(q, layer, tables, ctx, scale, graphs.parts)

    side = graphs.capture_stream  # (a new stream per capture leaves resources behind: cuda_graphs.py)
    side.wait_stream(torch.cuda.current_stream(cache.device))
    with torch.cuda.stream(side):
        step()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            step()
    torch.cuda.current_stream(cache.device).wait_stream(side)
    return _replay_ms(g, n)


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per token, after that
    step's forward pass (generate synchronises with the device every step to test for stopping)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


PREFILL_RUNS = 3


def hf_forward_s(hf, ids: torch.Tensor) -> float:
    """Seconds of one HF forward pass over the prompts `ids` ([B, T] on the model's device)."""
    with torch.no_grad():
        _sync(ids.device)
        t0 = time.perf_counter()
        hf(input_ids=ids, attention_mask=torch.ones_like(ids))
        _sync(ids.device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _prefills(llm, hf, prompts: torch.Tensor, runs: int = PREFILL_RUNS) -> tuple[float, float | None]:
    """Median seconds of `runs` prefills of the batch (prompts: [B, T] on the CPU) through our
    engine (its first token) and, given `hf`, of HF's forward pass over the same prompts,
    alternating, after one untimed run of each at this batch size (its first run also pays for new
    shapes: cuBLAS heuristics, allocator growth)."""
    batch = prompts.tolist()
    ids = prompts.to(llm.device) if hf is not None else None
    ours, theirs = [], []
    for i in range(runs + 1):
        t = _ours(llm, batch, 1)[0]
        h = hf_forward_s(hf, ids) if hf is not None else None
        if i:
            ours.append(t)
            theirs.append(h)
    return median(ours), median(theirs) if hf is not None else None


def _hf(hf, ids: torch.Tensor, max_tokens: int) -> tuple[float, list[list[int]]]:
    """HF's decode step (the time between the first and the last token of one generate call, per
    step; subtracting a separately timed prefill from generate's total could come out at or below
    zero on a busy machine) and its greedy tokens. Its prefill is timed by _prefills."""
    from transformers import LogitsProcessorList

    dev = ids.device
    mask = torch.ones_like(ids)
    clock = _StepClock()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
        _sync(dev)
    steps = len(clock.stamps) - 1
    step = (clock.stamps[-1] - clock.stamps[0]) / steps if steps > 0 else float("nan")
    return step, out[:, ids.shape[1]:].tolist()


BLOCK_SIZE = 16  # KV block size of engine_and_hf's engine (the default), which its cache is sized by


def engine_and_hf(bench: str, model: str, device: str, dtype: str, seed: int, max_batch: int, prompt_len: int,
                  max_tokens: int, cuda_graphs: bool = True):
    """A random model (random_hf_model) as our engine, sized for max_batch prompts of prompt_len
    tokens plus max_tokens new ones, and as HF's model on the device (greedy, no EOS), with
    max_batch random prompts [max_batch, prompt_len] on the CPU: (device, dtype, hf, llm, prompts)."""
    from ..llm import LLM

    dev, dt, src, hf = random_hf_model(bench, model, device, dtype, seed)
    per_seq = blocks_for(prompt_len + max_tokens, BLOCK_SIZE)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llm = LLM(model=d, device=str(dev), dtype=dtype, max_num_seqs=max_batch, block_size=BLOCK_SIZE,
                  kv_cache_blocks=max_batch * per_seq + 1, max_num_batched_tokens=max(max_batch * prompt_len, 8192),
                  cuda_graphs=cuda_graphs)
    hf = hf.to(dev)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, src.config.vocab_size, (max_batch, prompt_len), generator=g)
    return dev, dt, hf, llm, prompts


def add_engine_args(ap, batch: str) -> None:
    """The arguments of a benchmark script built on engine_and_hf: --model, --device, --dtype (bench
    decode's random OPT-1.3B in fp16 on CUDA), --batch (comma-separated, parsed into a list; default
    `batch`) and --prompt-len (512)."""
    ap.add_argument("--model", default="random:opt-1.3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", default=batch, type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-len", type=int, default=512)


def run(model: str, device: str, dtype: str, batches: list[int], prompt_len: int, max_tokens: int, seed: int,
        hf_baseline: bool, json_path: str | None, replicate: bool = False, pairs: int = 2,
        replicate_every: int = 1, replica_holder: str = "thread", replicate_skip: str = "none",
        replicate_paths: tuple[str, ...] = REPLICATE_PATHS, compare_pdl: bool = False,
        swap_stream: bool = False, swap_driver: str = "step") -> dict:
    from .. import _C

    dev, dt, hf, llm, prompts = engine_and_hf("decode", model, device, dtype, seed, max(batches), prompt_len,
                                              max_tokens)
    per_seq = blocks_for(prompt_len + max_tokens, BLOCK_SIZE)  # (the swap streams' shadow microbatches)
    bw = device_bandwidth(dev) if dev.type == "cuda" else 0.0
    wbytes = weight_bytes(llm.model)
    floor_ms = 1e3 * wbytes / bw if bw else 0.0
    result = {"model": model, "device": str(dev), "dtype": str(dt).replace("torch.", ""), "prompt_len": prompt_len,
              "max_tokens": max_tokens, "weight_bytes": wbytes, "copy_bandwidth_GBps": bw / 1e9,
              "floor_ms": floor_ms, "cuda_graphs": llm.engine.runner.graphs is not None,
              "replicate_every": replicate_every if replicate else None,
              "replica_holder": replica_holder if replicate else None,
              "replicate_skip": replicate_skip if replicate else None,
              "replicate_paths": list(replicate_paths) if replicate else None,
              # the setting, on a device that has it (the kernels' own check is on their build too)
              "programmatic_launch": (_C.programmatic_launch() and dev.type == "cuda"
                                      and torch.cuda.get_device_capability(dev)[0] >= 9),
              "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "rows": []}
    # Warm-up at the measured prompt length: kernels, allocator, cuBLAS heuristics, HF's generate.
    _ours(llm, prompts[:1].tolist(), 4)
    if hf_baseline:
        _hf(hf, prompts[:1].to(dev), 4)
    print(f"{result['card']}, {result['dtype']}, {model}: weights {wbytes / 1e9:.2f} GB, copy bandwidth "
          f"{bw / 1e9:.0f} GB/s (read+write) -> floor {floor_ms:.3f} ms/step")
    print(f"{'batch':>5} {'prefill ms':>10} {'HF prefill':>10} {'ms/step':>8} {'sync':>8} {'GPU ms':>8} {'attn ms':>8} "
          f"{'eager':>8} {'HF':>8} "
          f"{'tok/s':>9} {'x floor':>7} {'x HF':>6} {'same as HF':>10}")
    for b in batches:
        graphs = llm.engine.runner.graphs  # (replication through the ring captures them again)
        batch = prompts[:b].tolist()
        advanced = _advanced_steps(llm)
        pre, hpre = _prefills(llm, hf if hf_baseline else None, prompts[:b])
        _, step, ours_ids = _ours(llm, batch, max_tokens)
        row = {"batch": b, "prefill_ms": 1e3 * pre, "prefill_runs": PREFILL_RUNS, "ms_per_step": 1e3 * step, "tok_s": b / step}
        if graphs is not None:  # steps that ran from the inputs the step before left on the device
            row["advanced_steps"] = _advanced_steps(llm) - advanced
        if llm.engine.overlap:  # the baseline: each step waits for its tokens before the next is queued
            llm.engine.overlap = False
            row["sync_ms_per_step"] = 1e3 * _ours(llm, batch, max_tokens)[1]
            llm.engine.overlap = True
        if graphs is not None:
            row["gpu_ms_per_step"] = replay_ms(graphs, b)
            row["attention_ms_per_step"] = attention_ms(graphs, b)
            llm.engine.runner.graphs = None
            row["eager_ms_per_step"] = 1e3 * _ours(llm, batch, max_tokens)[1]
            llm.engine.runner.graphs = graphs
        if floor_ms:
            row["x_floor"] = row["ms_per_step"] / floor_ms
        if hf_baseline:
            hstep, hf_ids = _hf(hf, prompts[:b].to(dev), max_tokens)
            row.update(hf_prefill_ms=1e3 * hpre, hf_ms_per_step=1e3 * hstep, speedup_vs_hf=hstep / step,
                       prefill_vs_hf=hpre / pre, identical_sequences=f"{sum(a == c for a, c in zip(ours_ids, hf_ids))}/{b}",
                       hf_first_difference=[first_difference(a, c) for a, c in zip(ours_ids, hf_ids)])
        if replicate:
            row.update(_with_replication(llm, batch, max_tokens, pairs, replicate_every, replica_holder,
                                         replicate_skip, tuple(replicate_paths)))
        if compare_pdl:
            row.update(_with_pdl(llm, batch, max_tokens, pairs))
        if swap_stream:
            row.update(_with_swap(llm, batch, max_tokens, pairs, b * per_seq, swap_driver))
        if swap_stream and replicate:  # both streams at once, against neither
            row.update(_with_both(llm, batch, max_tokens, pairs, b * per_seq, replicate_paths[0], replicate_every,
                                  replica_holder, swap_driver))
        result["rows"].append(row)
        f = lambda k, w=8, p=3: f"{row[k]:>{w}.{p}f}" if k in row else f"{'-':>{w}}"  # noqa: E731
        print(f"{b:>5} {f('prefill_ms', 10, 1)} {f('hf_prefill_ms', 10, 1)} {f('ms_per_step')} {f('sync_ms_per_step')} "
              f"{f('gpu_ms_per_step')} {f('attention_ms_per_step')} {f('eager_ms_per_step')} {f('hf_ms_per_step')} "
              f"{f('tok_s', 9, 1)} {f('x_floor', 7, 2)} "
              f"{f('speedup_vs_hf', 6, 1)} {row.get('identical_sequences', '-'):>10}")
        parted = sorted(i for i in row.get("hf_first_difference", []) if i is not None)
        if parted:  # (fp16: near-ties round differently in other kernels, and the sequences part there)
            print(f"      {len(parted)} sequence(s) part from HF's at new token {', '.join(map(str, parted[:8]))}"
                  f"{' ...' if len(parted) > 8 else ''} (of {max_tokens})")
        if replicate:
            for p, r in row["replicate_by_path"].items():
                print(_paired_line(f"with replication ({p})", r["ms_per_step"], row["replicate_off_ms_per_step"],
                                   r["ratio"], r["pair_ratios"], pairs)
                      + f"; {r['advanced_steps']} steps without an input copy")
            print(f"      {row['replicate_acked']} steps acknowledged, replica exact: {row['replica_exact']}, "
                  f"ring full: {row['replicate_ring_misses']} steps, overlapped: {row['replicate_chained_steps']} steps")
            if "ring_gpu_ratio" in row:
                print(f"      GPU time of replayed steps: {row['ring_gpu_on_ms']:.3f} ms storing ring rows, "
                      f"{row['ring_gpu_off_ms']:.3f} without -> {row['ring_gpu_ratio']:.4f}")
        if swap_stream:
            print(_paired_line("with a swap stream", row["swap_ms_per_step"], row["swap_off_ms_per_step"],
                               row["swap_ratio"], row["swap_pair_ratios"], pairs)
                  + f"; {row['swap_prefetches']} swap-ins, {row['swap_bytes_in'] / 1e9:.2f} GB in; "
                  f"same tokens: {row['swap_same_tokens']}")
            if "swap_gpu_ratio" in row:
                print(f"      GPU time of replayed steps: {row['swap_gpu_on_ms']:.3f} ms with swap-ins crossing, "
                      f"{row['swap_gpu_off_ms']:.3f} without -> {row['swap_gpu_ratio']:.3f}; host time starting "
                      f"swap-ins: {row['swap_host_ms_per_step']:.3f} ms per step")
            if "swap_loop_busy_ratio" in row:
                print(f"      device time of the decode loop's steps: {row['swap_loop_busy_on_ms']:.3f} ms busy with "
                      f"swap-ins, {row['swap_loop_busy_off_ms']:.3f} without -> {row['swap_loop_busy_ratio']:.3f}; "
                      f"idle between steps {row['swap_loop_gap_on_ms']:.3f} / {row['swap_loop_gap_off_ms']:.3f} ms; "
                      f"a swap-in still crossing after the last step: {row['swap_tail_ms']:.1f} ms a run (not counted)")
        if swap_stream and replicate:
            print(_paired_line(f"with replication ({row['both_path']}) and a swap stream at once",
                               row["both_ms_per_step"], row["both_off_ms_per_step"], row["both_ratio"],
                               row["both_pair_ratios"], pairs)
                  + f"; {row['both_acked']} steps acknowledged, replica exact: {row['both_replica_exact']}, "
                  f"{row['both_swap_prefetches']} swap-ins, {row['both_advanced_steps']} steps without an input copy; "
                  f"same tokens: {row['both_same_tokens']}")
        if compare_pdl:
            gpu = (f"; GPU ms {row['pdl_on_gpu_ms']:.3f} against {row['pdl_off_gpu_ms']:.3f}"
                   if "pdl_on_gpu_ms" in row else "")
            print(_paired_line("programmatic launch on", row["pdl_on_ms_per_step"], row["pdl_off_ms_per_step"],
                               row["pdl_ratio"], row["pdl_pair_ratios"], pairs) + gpu)
    write_json(json_path, result)
    llm.shutdown()
    return result
