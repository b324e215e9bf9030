"""Turns a scheduled batch into tensors, runs the model over the paged cache, returns logits."""
from __future__ import annotations

import torch

from ..models.base import DecoderLM
from ..models.layers import AttnMetadata
from .kv_cache import PagedKVCache
from .sequence import Sequence


def build_metadata(seqs: list[Sequence], is_prefill: bool, block_size: int, device: torch.device):
    """Returns (input_ids [N], positions [N], AttnMetadata, last_index [B]) for the new tokens:
    everything not yet cached for a prefill, the newest token for a decode."""
    ids, pos, blk, off, q_lens = [], [], [], [], []
    for s in seqs:
        start = s.num_cached if is_prefill else len(s) - 1
        for p in range(start, len(s)):
            ids.append(s.token_ids[p])
            pos.append(p)
            blk.append(s.block_table[p // block_size])
            off.append(p % block_size)
        q_lens.append(len(s) - start)
    n, b, t = len(ids), len(seqs), max(q_lens)
    max_blocks = max(len(s.block_table) for s in seqs)
    q_index = torch.full((b, t), n, dtype=torch.long)
    q_positions = torch.zeros((b, t), dtype=torch.long)
    block_tables = torch.zeros((b, max_blocks), dtype=torch.long)
    out_index, last_index = [], []
    start = 0
    for i, (s, q) in enumerate(zip(seqs, q_lens)):
        q_index[i, :q] = torch.arange(start, start + q)
        q_positions[i, :q] = torch.tensor(pos[start:start + q])
        block_tables[i, :len(s.block_table)] = torch.tensor(s.block_table)
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
        ids, pos, meta, last = build_metadata(seqs, is_prefill, self.cache.block_size, self.cache.device)
        hidden = self.model(ids, pos, meta, self.cache.tensor)
        logits = self.model.compute_logits(hidden[last])
        for s in seqs:
            s.num_cached = len(s)
        return logits
