"""Decode steps replayed from CUDA graphs (the GPU fast path of the single-process engine).

A decode step of B sequences is one new token each. For every batch-size bucket (1, 2, 4, 8, then
steps of 16 up to max_num_seqs) the whole forward pass plus the LM head is captured once over
static device buffers: token ids, positions, cache slots, context lengths and block tables sized
for max_model_len. A step fills a pinned host copy of those buffers, moves them in one
asynchronous copy and replays the smallest bucket that fits. Each bucket's graph reads its inputs
packed at the start of the buffer (fields of `bucket` rows each), so a step moves only its
bucket's bytes: a few hundred at batch 1, where a packing for the largest bucket moved the whole
buffer every step. The copy is the graph's first node, so a step is a single launch. The copy is DéjàVuLib's span-copy
kernel reading the pinned buffer over PCIe, not a copy-engine memcpy: a swap-in or any other large
host-to-device DMA running beside the step would otherwise hold the step's inputs behind it in the
copy engine's queue (DEJAVU_GRAPH_INPUT_COPY=memcpy for the memcpy, to compare); rows past the batch are padding
(their KV write is skipped, their attention has no keys). Nothing in a step waits for the GPU
until the caller reads the sampled tokens. Each graph ends with the rows' greedy tokens (argmax)
on the device and in pinned memory; a row whose input id is -1 takes the token the step before
picked, so the engine can queue a step before it has read the last one's tokens (overlapped
steps, llm_engine.py). There are two pinned input buffers, each with its own graphs, used in turn:
a step's inputs are written while the step before may still be queued. With a replication ring (ModelRunner.set_kv_tap) the
graphs also write each new token's K/V into the ring rows a buffer field names (-1: none). A step
that follows the last one over the same rows needs no input copy at all (an "advance" graph, see
run()): the last step's greedy kernel left its inputs on the device, ring rows included.

Capture needs the decode kernels (dejavu.kernels): attention over a cache gathered with dynamic
shapes cannot be replayed. Capturing happens when the engine starts, so the first request does not
pay for it.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from .. import _C, kernels
from ..models.base import DecoderLM
from ..models import tp
from ..models.layers import AttnMetadata, KVRing
from .block_manager import blocks_for
from .kv_cache import PagedKVCache

log = logging.getLogger("dejavu.engine")


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def graphs_supported(model: DecoderLM, cache: PagedKVCache) -> str | None:
    """None when decode steps of this model and cache can be captured, else why not."""
    if cache.device.type != "cuda":
        return "not on CUDA"
    if not (model.is_first and model.is_last):
        return "a pipeline stage (graphs cover whole models)"
    if tp.is_parallel(model):
        return "tensor parallel"
    if any(getattr(m, "window", 0) for m in model.modules()):
        return "sliding-window attention (windowed layers run the torch attention, which graphs do not cover)"
    if not kernels.usable(cache.tensor, cache.head_dim):
        return f"no decode kernel for {cache.dtype} with head size {cache.head_dim} (or DEJAVU_ATTENTION=torch)"
    return None


class DecodeGraphs:
    FIELDS = kernels.STEP_FIELDS  # ids, positions, slot blocks, slot offsets, context lengths, ring rows

    def __init__(self, model: DecoderLM, cache: PagedKVCache, max_batch: int, max_model_len: int,
                 ring: KVRing | None = None, stream: torch.cuda.Stream | None = None):
        self.model, self.cache, self.ring = model, cache, ring
        # The stream graphs are captured on: one for good, kept by recapture(). With a new stream
        # per capture, each capture added a cuBLAS workspace (about 32 MiB, never freed), and on an
        # H200 graphs from the third capture on replayed 5% slower at batch 8 with the same kernels
        # and the same kernel times (cause not established; docs/gpu-fast-path.md).
        self.capture_stream = stream if stream is not None else torch.cuda.Stream(cache.device)
        self._args = (max_batch, max_model_len)
        self.block_size = cache.block_size
        self.max_blocks = blocks_for(max_model_len, cache.block_size)
        self.parts = kernels.num_parts(self.max_blocks * cache.block_size)
        self.buckets = batch_buckets(max_batch)
        mb = self.max_batch = self.buckets[-1]
        # Packed int64 fields of a bucket b: ids, positions, slot blocks, slot offsets, context
        # lengths, ring rows (b each), then the block tables (b x max_blocks), from offset 0.
        total = self._words(mb)
        # Two pinned input buffers, each with its own graph per bucket, used in turn: a step's inputs
        # are written while the step before it (reading the other buffer) may still be queued.
        self.host = [torch.zeros(total, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.host_np = [h.numpy() for h in self.host]
        self.dev = torch.zeros(total, dtype=torch.int64, device=cache.device)
        # Every graph ends with each row's greedy token here; a step whose input id is -1 (its
        # newest token was sampled by the step before, still on the device) reads it from here first.
        self.tokens = torch.zeros(mb, dtype=torch.int64, device=cache.device)
        self.last_tokens: torch.Tensor | None = None  # the view run(greedy=True) returned last
        # ... and the graph writes them to pinned memory too (the host reads them from there once the
        # step is done; no copy of its own to queue), one row per input buffer.
        self.host_tokens = [torch.zeros(mb, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.last_host: torch.Tensor | None = None
        self.token_desc = torch.tensor([[0, 0, 8 * b] for b in self.buckets], dtype=torch.int64, device=cache.device)
        # one span per bucket: (0, 0, its bytes)
        self.desc = torch.tensor([[0, 0, 8 * self._words(b)] for b in self.buckets], dtype=torch.int64,
                                 device=cache.device)
        self.input_copy = os.environ.get("DEJAVU_GRAPH_INPUT_COPY", "kernel")
        if self.input_copy not in ("kernel", "memcpy"):
            raise ValueError(f"DEJAVU_GRAPH_INPUT_COPY must be kernel or memcpy, got {self.input_copy!r}")
        self.replayed = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0  # the input buffer the next step writes
        # The greedy kernel at the end of a graph (kernels.greedy_step_end) also advances the device
        # inputs for the next step, so each bucket has "advance" graphs as well: no input copy, for
        # a step that follows the last one over the same sequences whose block tables there are
        # still current (run()). DEJAVU_GREEDY=torch: torch.argmax and a copy kernel, no such graphs.
        self.fused_end = kernels.switched_on("DEJAVU_GREEDY")
        self.num_advanced = 0  # steps that ran from the inputs the step before left on the device
        self._last: tuple[int, list[int], list[int]] | None = None  # bucket, positions, table lengths there
        # Replication ring rows: the ring's size, and the first row the last step wrote (-1: none).
        # The greedy kernel advances ring rows as ReplicaSender::ring_stage reserves them, so a
        # replicated step can run from the device's inputs too when the sender reserved exactly those.
        # DEJAVU_RING_ADVANCE=0: a replicated step always copies its inputs (the baseline).
        ring_advance = os.environ.get("DEJAVU_RING_ADVANCE", "1") != "0"
        self.ring_size = int(ring.tensor.shape[1]) if ring is not None and ring_advance else 0
        self._last_ring = -1
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # A list to time steps on the device (benchmarks): run() appends a (start, end) pair of
        # timing events around each replay. None: nothing recorded.
        self.step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    def recapture(self, ring: KVRing | None) -> "DecodeGraphs":
        """The same graphs captured again, writing into `ring`."""
        fresh = DecodeGraphs(self.model, self.cache, *self._args, ring=ring, stream=self.capture_stream)
        self.graphs.clear()
        fresh.capture()
        return fresh

    def _words(self, bucket: int) -> int:
        return (self.FIELDS + self.max_blocks) * bucket

    def _views(self, t, bucket: int):
        nf = self.FIELDS
        f = [t[i * bucket:(i + 1) * bucket] for i in range(nf)]
        tables = t[nf * bucket:self._words(bucket)].view(bucket, self.max_blocks)
        return (*f, tables)

    def _step(self, bucket: int, turn: int, advance: bool = False) -> torch.Tensor:
        """The bucket's inputs from pinned buffer `turn` to the device (unless `advance`: the step
        before left them there), the forward pass and the greedy tokens: all captured in the
        (bucket, turn, advance) graph, so a step is one graph launch."""
        words = self._words(bucket)
        index = self.buckets.index(bucket)
        stream = torch.cuda.current_stream(self.cache.device).cuda_stream
        if advance:
            pass
        elif self.input_copy == "kernel":
            _C.cuda_copy_spans(self.host[turn].data_ptr(), self.dev.data_ptr(), self.desc[index].data_ptr(), 1,
                               stream, 8 * words)
        else:
            self.dev[:words].copy_(self.host[turn][:words], non_blocking=True)
        ids, pos, blk, off, ctx, rows, tables = self._views(self.dev, bucket)
        tokens = self.tokens[:bucket]
        if not advance:  # (an advance graph's ids are the last step's tokens already: greedy_step_end wrote them)
            ids = torch.where(ids < 0, tokens, ids)  # (before this step overwrites them)
        meta = AttnMetadata(slot_blocks=blk, slot_offsets=off, block_tables=tables, context_lens=ctx,
                            num_parts=self.parts, ring=self.ring, ring_rows=rows if self.ring is not None else None)
        logits = self.model.compute_logits(self.model(ids, pos, meta, self.cache.tensor))
        if self.fused_end:  # argmax, its pinned copy and the next step's inputs: one kernel
            kernels.greedy_step_end(logits, tokens, self.host_tokens[turn], self.dev[:words], bucket,
                                    self.max_blocks, self.block_size, self.ring_size)
            return logits
        torch.argmax(logits, dim=-1, out=tokens)
        # the greedy tokens to pinned memory: by the span-copy kernel (a copy-engine memcpy could
        # queue behind a swap's DMA), or by a memcpy with DEJAVU_GRAPH_INPUT_COPY=memcpy
        if self.input_copy == "kernel":
            _C.cuda_copy_spans(self.tokens.data_ptr(), self.host_tokens[turn].data_ptr(),
                               self.token_desc[index].data_ptr(), 1, stream, 8 * bucket)
        else:
            self.host_tokens[turn][:bucket].copy_(tokens, non_blocking=True)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        side = self.capture_stream
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for bucket in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
                for turn in range(2):
                    for advance in (False, True) if self.fused_end else (False,):
                        # all padding: nothing is written to the cache while capturing
                        self._fill([], bucket, turn)
                        self._step(bucket, turn)  # warm-up (lazy initialisation stays out of the graph)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool, stream=side):
                            out = self._step(bucket, turn, advance)
                        pool = g.pool()
                        self.graphs[bucket, turn, advance] = (g, out)
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        torch.cuda.synchronize(self.cache.device)
        log.info("captured decode CUDA graphs for batch sizes %s in %.2f s", self.buckets, time.perf_counter() - t0)

    def fits(self, items) -> bool:
        """True for a decode-shaped batch (one new token each) the captured graphs hold."""
        return len(items) <= self.max_batch and all(len(x[0]) == 1 and len(x[2]) <= self.max_blocks for x in items)

    def _fill(self, items, bucket: int, turn: int, first: int = -1) -> None:
        """Write the step's inputs into pinned buffer `turn`, with ring rows from `first` (-1: none)."""
        mb, h = bucket, self.host_np[turn]
        h[:self.FIELDS * mb] = 0
        h[2 * mb:3 * mb] = -1  # padding rows store nothing
        h[5 * mb:6 * mb] = -1  # nor go to the ring
        for i, (ids, start, table) in enumerate(items):
            h[i] = ids[-1]
            h[mb + i] = start
            h[2 * mb + i] = table[start // self.block_size]
            h[3 * mb + i] = start % self.block_size
            h[4 * mb + i] = start + 1
            row = self.FIELDS * mb + i * self.max_blocks
            h[row:row + len(table)] = table
        if first >= 0:
            h[5 * mb:5 * mb + len(items)] = np.arange(first, first + len(items))

    def bucket(self, batch: int) -> int:
        """The captured batch size that holds `batch` rows: the smallest bucket at least as large."""
        return next(x for x in self.buckets if x >= batch)

    def graph(self, batch: int) -> torch.cuda.CUDAGraph:
        """A graph for `batch` rows that copies its inputs (benchmarks replay it by itself)."""
        self._last = None  # the device inputs will not be those the last step left
        return self.graphs[self.bucket(batch), 0, False][0]

    # Hooks for benchmarks that replay a step's graph alone (bench/decode_*.py).
    def stage_inputs(self, items, batch: int, ring_first: int = -1) -> None:
        """Write a step's inputs (items as run() takes them) where graph(batch) reads them, with
        ring rows from `ring_first` (-1: the step writes no ring rows)."""
        self._fill(items, self.bucket(batch), 0, ring_first)

    def attention_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The device block tables and context lengths the last step of batch's bucket attended over."""
        *_, ctx, _rows, tables = self._views(self.dev, self.bucket(batch))
        return tables, ctx

    def _advances(self, items, bucket: int) -> bool:
        """True when the device holds this step's inputs already (ring rows aside, see run()): the
        last step ran over the same rows in the same bucket, each now one position further with its
        input token the one that step picked, and each row's block-table entry for its new position
        was on the device."""
        last = self._last
        if not self.fused_end or last is None or last[0] != bucket or len(last[1]) != len(items):
            return False
        return all(ids == [-1] and start == p + 1 and start // self.block_size < n
                   for (ids, start, _), p, n in zip(items, last[1], last[2]))

    def run(self, items, tap=None, greedy: bool = False) -> torch.Tensor:
        """Logits [B, vocab] for a decode batch of (new token ids (one, or -1 for the token the
        previous step sampled), position, block table) items, or with `greedy` each row's greedy
        token ([B] int64, on the device). `tap` (a Replicator whose ring these graphs were captured
        with) stages ring rows for them."""
        bucket = self.bucket(len(items))
        turn = self.turn
        self.turn ^= 1
        self.replayed[turn].synchronize()  # the step two before this one has read this pinned buffer
        starts = [x[1] for x in items]
        first = -1  # the first ring row reserved for this step (-1: none)
        if tap is not None and self.ring is not None:
            bs = self.block_size
            first = tap.stage(np.array([t[s // bs] for _, s, t in items], dtype=np.int64),
                              np.array([s % bs for _, s, _ in items], dtype=np.int64))
        # The device holds the rows the last step's ring rows lead to (or none after none): run from
        # them only where the sender reserved exactly those.
        advance = self._advances(items, bucket) and first == _C.next_ring_row(self._last_ring, len(items),
                                                                                self.ring_size)
        if advance:
            self.num_advanced += 1
            self._last = (bucket, starts, self._last[2])
        else:
            self._fill(items, bucket, turn, first)
            self._last = (bucket, starts, [len(x[2]) for x in items])
        self._last_ring = first
        g, out = self.graphs[bucket, turn, advance]
        timed = self.step_events
        if timed is not None:
            timed.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            timed[-1][0].record()
        g.replay()
        if timed is not None:
            timed[-1][1].record()
        self.replayed[turn].record()
        if greedy:
            self.last_tokens = self.tokens[:len(items)]
            self.last_host = self.host_tokens[turn][:len(items)]
            return self.last_tokens
        return out[:len(items)]

