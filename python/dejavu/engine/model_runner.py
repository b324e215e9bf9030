"""Turns a scheduled batch into tensors, runs the model over the paged cache, returns logits."""
from __future__ import annotations

import torch

from ..models.base import DecoderLM
from ..models.layers import AttnMetadata
from .kv_cache import PagedKVCache
from .sequence import Sequence


def step_items(seqs: list[Sequence], is_prefill: bool) -> list[tuple[list[int], int, list[int]]]:
    """(new token ids, position of the first, block table) per sequence: everything not yet
    cached for a prefill, the newest token for a decode."""
    out = []
    for s in seqs:
        start = s.num_cached if is_prefill else len(s) - 1
        out.append((s.token_ids[start:], start, s.block_table))
    return out


def build_metadata(items: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device):
    """Returns (input_ids [N], positions [N], AttnMetadata, last_index [B]) for a batch of
    (new token ids, first position, block table) items."""
    ids, pos, blk, off, q_lens = [], [], [], [], []
    for new_ids, start, table in items:
        for i, tok in enumerate(new_ids):
            p = start + i
            ids.append(tok)
            pos.append(p)
            blk.append(table[p // block_size])
            off.append(p % block_size)
        q_lens.append(len(new_ids))
    n, b, t = len(ids), len(items), max(q_lens)
    max_blocks = max(len(table) for _, _, table in items)
    q_index = torch.full((b, t), n, dtype=torch.long)
    q_positions = torch.zeros((b, t), dtype=torch.long)
    block_tables = torch.zeros((b, max_blocks), dtype=torch.long)
    out_index, last_index = [], []
    start = 0
    for i, ((_, _, table), q) in enumerate(zip(items, q_lens)):
        q_index[i, :q] = torch.arange(start, start + q)
        q_positions[i, :q] = torch.tensor(pos[start:start + q])
        block_tables[i, :len(table)] = torch.tensor(table)
        out_index.extend(range(i * t, i * t + q))
        last_index.append(start + q - 1)
        start += q
    as_dev = lambda x: torch.as_tensor(x, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    meta = AttnMetadata(slot_blocks=as_dev(blk), slot_offsets=as_dev(off), block_tables=as_dev(block_tables),
                        q_index=as_dev(q_index), out_index=as_dev(out_index), q_positions=as_dev(q_positions),
                        key_positions=torch.arange(max_blocks * block_size, device=device))
    return as_dev(ids), as_dev(pos), meta, as_dev(last_index)


class ModelRunner:
    def __init__(self, model: DecoderLM, cache: PagedKVCache):
        self.model = model
        self.cache = cache

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits [B, vocab] (float32) of each sequence's last new token; marks the K/V as cached."""
        ids, pos, meta, last = build_metadata(step_items(seqs, is_prefill), self.cache.block_size, self.cache.device)
        hidden = self.model(ids, pos, meta, self.cache.tensor)
        logits = self.model.compute_logits(hidden[last])
        for s in seqs:
            s.num_cached = len(s)
        return logits
