"""stream_out / stream_in between workers laid out differently (see routing.py).

The sender packs, for each Transfer it owns, its local layers x the request's blocks x the
transfer's KV heads, and puts the bytes to the receiver's destination under
f"{key}.{transfer.key}"; the receiver fetches each and unpacks into its own blocks, layers and
heads. Whole-shard head ranges use the span gather; partial ones are packed with tensor slicing.
"""
from __future__ import annotations

import torch

from .futures import Future, gather_futures
from .region import Region
from .routing import Transfer
from .streamer import KVStreamer


def _full_heads(streamer: KVStreamer, heads: tuple[int, int]) -> bool:
    return heads == (0, streamer.cache.num_kv_heads)


def _payload_bytes(streamer: KVStreamer, t_layers, heads, nblocks: int) -> int:
    c = streamer.cache
    return ((t_layers[1] - t_layers[0]) * nblocks * 2 * c.block_size * (heads[1] - heads[0]) * c.head_dim
            * c.tensor.element_size())


def stream_out(streamer: KVStreamer, transfers: list[Transfer], me: str, blocks: list[int], dests: dict,
               key: str) -> Future:
    """Send this worker's part of a request's KV (its `blocks`) to every receiver."""
    parts = []
    for t in (t for t in transfers if t.src == me):
        dest, name = dests[t.dst], f"{key}.{t.key}"
        if _full_heads(streamer, t.src_heads):
            parts.append(streamer.stream_out(Region.chunks(range(*t.src_layers), blocks), dest, name))
            continue
        n = _payload_bytes(streamer, t.src_layers, t.src_heads, len(blocks))
        buf = streamer.pool.alloc(n)
        idx = torch.tensor(blocks, device=streamer.device)
        part = streamer.cache.tensor[t.src_layers[0]:t.src_layers[1]].index_select(1, idx)[..., t.src_heads[0]:t.src_heads[1], :]
        buf.tensor.copy_(part.contiguous().view(-1).view(torch.uint8), non_blocking=False)
        parts.append(Future(f"stream_out {name!r}", parts=[dest.put(name, buf.tensor)], cleanup=buf.free, nbytes=n))
    return gather_futures(f"stream_out {key!r} from {me}", parts)


def stream_in(streamer: KVStreamer, transfers: list[Transfer], me: str, blocks: list[int], sources: dict,
              key: str) -> Future:
    """Receive every sender's part of a request's KV into this worker's `blocks`."""
    parts = []
    for t in (t for t in transfers if t.dst == me):
        src, name = sources[t.src], f"{key}.{t.key}"
        if _full_heads(streamer, t.dst_heads):
            parts.append(streamer.stream_in(src, name, Region.chunks(range(*t.dst_layers), blocks)))
            continue
        n = _payload_bytes(streamer, t.dst_layers, t.dst_heads, len(blocks))
        buf = streamer.pool.alloc(n)

        def unpack(t=t, buf=buf):
            c = streamer.cache
            shape = (t.dst_layers[1] - t.dst_layers[0], len(blocks), 2, c.block_size, t.dst_heads[1] - t.dst_heads[0],
                     c.head_dim)
            part = buf.tensor.view(c.tensor.dtype).view(shape).to(streamer.device)
            idx = torch.tensor(blocks, device=streamer.device)
            for i, layer in enumerate(range(*t.dst_layers)):
                view = c.tensor[layer, :, :, :, t.dst_heads[0]:t.dst_heads[1], :]
                view.index_copy_(0, idx, part[i])
            return None
        parts.append(Future(f"stream_in {name!r}", parts=[src.get(name, buf.tensor)], then=unpack, cleanup=buf.free,
                            nbytes=n))
    return gather_futures(f"stream_in {key!r} to {me}", parts)
