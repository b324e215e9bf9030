"""Turns a scheduled batch into tensors, runs the model over the paged cache, returns logits."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .. import kernels
from ..models.base import DecoderLM
from ..models.layers import AttnMetadata
from .kv_cache import PagedKVCache
from .sequence import Sequence


def step_items(seqs: list[Sequence], is_prefill: bool) -> list[tuple[list[int], int, list[int]]]:
    """(new token ids, position of the first, block table) per sequence: everything not yet
    cached for a prefill, the newest token for a decode. A decode whose newest token is still being
    computed on the device (Sequence.inflight) gets the id -1: the step takes it from the tokens
    the step before it sampled (ModelRunner.run_greedy)."""
    out = []
    for s in seqs:
        if s.inflight:
            out.append(([-1], len(s) + s.inflight - 1, s.block_table))
            continue
        start = s.num_cached if is_prefill else len(s) - 1
        out.append((s.token_ids[start:], start, s.block_table))
    return out


def build_metadata(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device,
                   tap=None):
    """Returns (input_ids [N], positions [N], AttnMetadata, last_index [B]) for a batch of
    (new token ids, first position, block table) items. Every integer crosses to the device in
    one copy (views of one packed tensor). `tap` (a Replicator with a ring): a decode step's new
    K/V also go to the ring rows it stages (serving/replication.py); any other step stages none."""
    q_lens = np.fromiter((len(x[0]) for x in items), np.int64, len(items))
    starts = np.fromiter((x[1] for x in items), np.int64, len(items))
    n, b, t = int(q_lens.sum()), len(items), int(q_lens.max())
    max_blocks = max(len(x[2]) for x in items)
    tables = np.zeros((b, max_blocks), np.int64)
    for i, x in enumerate(items):
        tables[i, :len(x[2])] = x[2]
    ids = np.fromiter(itertools.chain.from_iterable(x[0] for x in items), np.int64, n)
    seq_of = np.repeat(np.arange(b), q_lens)
    first = np.cumsum(q_lens) - q_lens            # index of each sequence's first new token
    local = np.arange(n) - first[seq_of]          # index of each token inside its sequence's new tokens
    pos = starts[seq_of] + local
    q_index = np.full((b, t), n, np.int64)
    q_index[seq_of, local] = np.arange(n)
    q_positions = np.zeros((b, t), np.int64)
    q_positions[seq_of, local] = pos
    last = first + q_lens - 1
    decode = t == 1
    spans = tuple(zip(first.tolist(), q_lens.tolist(), starts.tolist())) if not decode and starts.any() else None
    slot_blocks, slot_offsets = tables[seq_of, pos // block_size], pos % block_size
    ring_rows = None
    if tap is not None and decode:
        first = tap.stage(slot_blocks, slot_offsets)
        if first >= 0:
            ring_rows = np.arange(first, first + n, dtype=np.int64)
    elif tap is not None:
        tap.cancel_staged()
    # few new tokens a sequence over a cached context (prefix hits, a recovery's recomputation):
    # a query row each through the decode kernel (models/layers.py paged_attention)
    rows = spans is not None and device.type == "cuda" and t <= kernels.CONTEXT_ROWS_MAX_TOKENS
    none = np.zeros(0, np.int64)
    fields = [ids, pos, slot_blocks, slot_offsets, tables, q_index, seq_of * t + local,
              q_positions, last, pos[last] + 1 if decode else none,
              ring_rows if ring_rows is not None else none, tables[seq_of] if rows else none, pos + 1 if rows else none]
    packed = torch.from_numpy(np.concatenate([f.reshape(-1) for f in fields])).to(device, non_blocking=True)
    views, at = [], 0
    for f in fields:
        views.append(packed[at:at + f.size].view(f.shape))
        at += f.size
    d_ids, d_pos, d_blk, d_off, d_tables, d_qi, d_oi, d_qp, d_last, d_ctx, d_ring, d_row_tables, d_row_ctx = views
    meta = AttnMetadata(slot_blocks=d_blk, slot_offsets=d_off, block_tables=d_tables, q_index=d_qi, out_index=d_oi,
                        q_positions=d_qp, key_positions=torch.arange(max_blocks * block_size, device=device),
                        context_lens=d_ctx if decode else None,
                        num_parts=kernels.num_parts(int(pos.max()) + 1) if decode or rows else 1,
                        fresh=not decode and not starts.any(), spans=spans,
                        row_tables=d_row_tables if rows else None, row_context=d_row_ctx if rows else None,
                        ring=tap.ring if ring_rows is not None else None,
                        ring_rows=d_ring if ring_rows is not None else None)
    return d_ids, d_pos, meta, d_last


class ModelRunner:
    def __init__(self, model: DecoderLM, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.graphs = None  # DecodeGraphs once enable_cuda_graphs() has captured them
        self.kv_tap = None  # a Replicator with a ring (set_kv_tap)
        self.kv_on_step = None  # called with each queued decode step's written positions (set_kv_tap)

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int) -> str | None:
        """Capture decode steps as CUDA graphs; returns None, or why they cannot be used here."""
        from .cuda_graphs import DecodeGraphs, graphs_supported

        why = graphs_supported(self.model, self.cache)
        if why is None:
            self.graphs = DecodeGraphs(self.model, self.cache, max_batch, max_model_len)
            self.graphs.capture()
        return why

    def set_kv_tap(self, tap, on_step=None) -> None:
        """Token-level replication of decode steps. `tap`: a Replicator (serving/replication.py)
        whose ring the steps' write-KV kernels also store each new token's K/V into (captured decode
        graphs are captured again for a new ring: its address is part of them); None, or a tap
        without a ring, writes no ring. `on_step(written)` is called as soon as each decode step is
        queued, with the (block table, start, end) positions it writes per sequence, so the caller
        hands them to the tap (Replicator.after_step) before the next step stages its rows: steps
        stay overlapped (llm_engine.py). Prefill steps are not passed on (a token worker's caller
        replicates admissions itself). set_kv_tap(None) stops both."""
        if tap is not None and on_step is None:
            raise ValueError("set_kv_tap: a tap needs on_step (its steps are committed as they are queued)")
        self.kv_tap = tap if tap is not None and tap.ring is not None else None
        self.kv_on_step = on_step
        if self.kv_tap is not None and self.graphs is not None and self.graphs.ring is not self.kv_tap.ring:
            self.graphs = self.graphs.recapture(self.kv_tap.ring)

    def _queued(self, items) -> None:
        """A decode step over `items` was queued: its written positions go to kv_on_step."""
        if self.kv_on_step is not None:
            self.kv_on_step([(table, start, start + len(ids)) for ids, start, table in items])

    def run(self, seqs: list[Sequence], is_prefill: bool, before=None, on_layer=None) -> torch.Tensor:
        """Logits [B, vocab] (float32) of each sequence's last new token; marks the K/V as cached.
        `before()` is called once the inputs are built, just before the forward pass, and
        `on_layer(i)` after layer i (a restore of cached blocks still in flight is waited for
        there, layer by layer; a CUDA graph runs every layer at once: all its waits come first)."""
        return self.run_with_rows(seqs, is_prefill, (), before, on_layer)[0]

    @torch.inference_mode()
    def run_with_rows(self, seqs: list[Sequence], is_prefill: bool, rows_of: list[int],
                      before=None, on_layer=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """run()'s logits, and for each index in `rows_of` the hidden states [new tokens, H] of
        every new token of that sequence (prompt logprobs, engine/prompt_logprobs.py)."""
        items = step_items(seqs, is_prefill)
        rows = []
        if self.graphs is not None and self.graphs.fits(items) and not rows_of:
            if before is not None:
                before()
            for i in range(self.cache.num_layers - 1) if on_layer is not None else ():
                on_layer(i)
            logits = self.graphs.run(items, self.kv_tap)
        else:
            ids, pos, meta, last = build_metadata(items, self.cache.block_size, self.cache.device, self.kv_tap)
            if before is not None:
                before()
            hidden = self.model(ids, pos, meta, self.cache.tensor, on_layer=on_layer)
            logits = self.model.compute_logits(hidden[last])
            starts = np.cumsum([0] + [len(x[0]) for x in items])
            rows = [hidden[starts[i]:starts[i + 1]] for i in rows_of]
        if not is_prefill:
            self._queued(items)
        for s in seqs:
            s.num_cached = len(s)
        return logits, rows

    @torch.inference_mode()
    def run_greedy(self, seqs: list[Sequence],
                   chain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step whose tokens are picked on the device: the greedy token of each sequence
        ([B] int64 on the device; nothing waits for it), and the host tensor (pinned on CUDA) they
        are on their way to, in stream order. `chain`: the tokens of the step before, which
        was over the same sequences in the same order; a sequence whose newest token is still being
        computed (Sequence.inflight) reads its input id from it. With CUDA graphs the argmax, that
        read and the host copy are part of the graph (which keeps the previous step's tokens)."""
        items = step_items(seqs, False)
        if self.graphs is not None and self.graphs.fits(items) and (chain is None or chain is self.graphs.last_tokens):
            tokens = self.graphs.run(items, self.kv_tap, greedy=True)
            host = self.graphs.last_host
        else:
            ids, pos, meta, last = build_metadata(items, self.cache.block_size, self.cache.device, self.kv_tap)
            if chain is not None:
                ids = torch.where(ids < 0, chain, ids)
            logits = self.model.compute_logits(self.model(ids, pos, meta, self.cache.tensor)[last])
            tokens = torch.argmax(logits, dim=-1)
            # (the caching host allocator hands the pinned block out again only after this copy)
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=tokens.is_cuda)
            host.copy_(tokens, non_blocking=True)
        self._queued(items)
        for s in seqs:
            s.num_cached = len(s) + s.inflight
        return tokens, host
