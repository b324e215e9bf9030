"""How `dejavu bench decode` times a batch: its decode through the engine, its decode graph replayed
alone on the device, and off / on runs alternated in pairs."""
from __future__ import annotations

import time

import torch

from .generate import _sync


def time_batch(llm, prompts: list[list[int]], max_tokens: int, swap=None,
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


def _paired(off: list[float], on: list[float]) -> tuple[float, float, float, list[float]]:
    """Seconds per step of alternating off / on runs of one batch: (ms per step off, ms per step on,
    on / off over all runs, each pair's on / off)."""
    n = len(off)
    return 1e3 * sum(off) / n, 1e3 * sum(on) / n, sum(on) / sum(off), [b / a for a, b in zip(off, on)]


def _paired_line(what: str, on_ms: float, off_ms: float, ratio: float, pair_ratios: list[float], pairs: int) -> str:
    return (f"      {what}: {on_ms:.3f} ms/step against {off_ms:.3f} off, alternating in {pairs} pairs -> {ratio:.3f} "
            f"(pairs: {', '.join(f'{x:.3f}' for x in pair_ratios)})")


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


def _advanced_steps(llm) -> int:
    """Decode steps so far that ran from the inputs the step before left on the device, by the
    engine's current graphs (0 without graphs; a ring's first use captures new ones)."""
    graphs = llm.engine.runner.graphs
    return graphs.num_advanced if graphs is not None else 0


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
    tables, ctx = graphs.attention_inputs(batch)
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
